"""Stage ``inspect``: figures and audio of the most anomalous and most typical recordings.

For the ``inspect.top_n`` recordings with the highest anomaly score, and
for the recording nearest to the centre of each cluster, the stage draws
the original and PCA-reconstructed spectrum, their difference, and the
original and reconstructed waveform. For ``fft_magnitude`` the
reconstructed waveform is the inverse FFT of the reconstructed magnitude
with the original phase, rescaled by the recording's normalization factor.
For the log-power kinds each band (of each frame) of the original is
turned up or down by the reconstruction's difference in dB
(`features.reconstruct_log_signal`). Both waveforms are
written as WAV files so that a person can listen to them: figures go to
``plots/inspect/figures`` (declared as DVC plots), sound to
``plots/inspect/audio``, and ``plots/inspect/index.csv`` lists them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from .audio import preprocess, read_wav, reconstruct_signal
from .cli import exit_with, run_stage
from .features import Layout, compute_features, load_layout, reconstruct_log_signal
from .linear import LinearReconstruction, load_reconstruction
from .errors import AudioInputError, PipelineError
from .outputs import (
    atomic_directory,
    load_npy,
    read_csv,
    save_figure,
    write_csv,
    write_wav,
)

if TYPE_CHECKING:
    from .detect import Models

log = logging.getLogger("audiomnist_anomalies.inspect")

RAW_DIR = Path("data/raw")
SPECTRA_PATH = Path("data/spectra.npy")
FREQUENCIES_PATH = Path("data/frequencies.npy")
RECORDINGS_PATH = Path("data/recordings.csv")
SCORES_PATH = Path("data/scores.csv")
CLUSTERS_PATH = Path("data/clusters.csv")
MODELS_DIR = Path("data/models")
OUTPUT_DIR = Path("plots/inspect")
# Peak level of the louder of the two WAV files of a recording, in full scale.
LISTENING_PEAK = 0.9
# From this many figures on they are drawn in worker processes. Each takes
# about 0.4 s, and forked workers start within milliseconds.
MIN_PARALLEL_FIGURES = 2

RANK_COLUMNS = {
    "reconstruction_error": "reconstruction_error_rank",
    "isolation_forest": "isolation_forest_rank",
}


def select_recordings(
    scores: list[dict[str, str]],
    clusters: list[dict[str, str]],
    top_n: int,
    rank_by: str,
) -> list[tuple[str, int]]:
    """Choose the recordings to inspect.

    Returns
    -------
    list of (name, row index)
        ``anomaly_01`` ... for the ``top_n`` highest-ranked recordings,
        then ``cluster_0`` ... for the member nearest to each cluster's
        centre. A recording may appear under both names.
    """
    rank_column = RANK_COLUMNS[rank_by]
    order = sorted(
        range(len(scores)), key=lambda i: (int(scores[i][rank_column]), scores[i]["recording_id"])
    )
    selected = [(f"anomaly_{rank + 1:02d}", index) for rank, index in enumerate(order[:top_n])]
    typical: dict[int, tuple[float, int]] = {}
    for index, row in enumerate(clusters):
        label = int(row["cluster"])
        distance = float(row["distance_to_centre"])
        if label not in typical or distance < typical[label][0]:
            typical[label] = (distance, index)
    for label in sorted(typical):
        selected.append((f"cluster_{label}", typical[label][1]))
    return selected


def draw_comparison(
    recording_id: str,
    title: str,
    layout: Layout,
    features: np.ndarray,
    reconstructed_features: np.ndarray,
    samples: np.ndarray,
    reconstructed_samples: np.ndarray,
    sample_rate: int,
):
    """Draw the features, their reconstruction, the difference and the waveforms.

    Features with time frames are drawn as images (time x frequency band);
    others as curves against frequency.
    """
    from .plotting import plt

    difference = features - reconstructed_features
    if layout.n_frames > 1:
        figure, axes = plt.subplots(4, 1, figsize=(9, 12))
        shape = (layout.n_frames, layout.frequencies.shape[0])
        extent = (0, samples.shape[0] / sample_rate, 0, shape[1])
        limit = float(np.max(np.abs(difference))) or 1.0
        panels = (
            (features, "original (dB of total power)", "viridis", None),
            (reconstructed_features, "PCA reconstruction (dB)", "viridis", None),
            (difference, "original - reconstruction (dB)", "coolwarm", (-limit, limit)),
        )
        for axis, (values, label, colours, limits) in zip(axes[:3], panels):
            image = axis.imshow(
                values.reshape(shape).T,
                origin="lower",
                aspect="auto",
                extent=extent,
                cmap=colours,
                vmin=None if limits is None else limits[0],
                vmax=None if limits is None else limits[1],
            )
            ticks = np.linspace(0, shape[1] - 1, 5).astype(int)
            axis.set_yticks(ticks + 0.5, [f"{layout.frequencies[tick]:.0f}" for tick in ticks])
            axis.set_ylabel("band centre (Hz)")
            figure.colorbar(image, ax=axis, label=label)
        axes[0].set_title(f"{recording_id}: {title}")
        wave_axis = axes[3]
    else:
        figure, axes = plt.subplots(3, 1, figsize=(9, 9))
        frequency_label = "frequency (Hz)" if layout.kind == "fft_magnitude" else "band centre (Hz)"
        value_label = "magnitude / maximum" if layout.kind == "fft_magnitude" else "dB of total power"
        axes[0].plot(layout.frequencies, features, lw=0.7, label="original")
        axes[0].plot(layout.frequencies, reconstructed_features, lw=0.7, label="PCA reconstruction")
        axes[0].set_ylabel(value_label)
        axes[0].legend(fontsize=8)
        axes[0].set_title(f"{recording_id}: {title}")
        axes[1].plot(layout.frequencies, difference, lw=0.7, color="tab:red")
        axes[1].axhline(0, color="black", lw=0.5)
        axes[1].set_ylabel("original - reconstruction")
        for axis in axes[:2]:
            axis.set_xlabel(frequency_label)
            if layout.kind != "fft_magnitude":
                axis.set_xscale("log")
        wave_axis = axes[2]

    time = np.arange(samples.shape[0]) / sample_rate
    wave_axis.plot(time, samples, lw=0.6, label="original (preprocessed)")
    wave_axis.plot(time, reconstructed_samples, lw=0.6, alpha=0.8, label="reconstruction")
    wave_axis.set_xlabel("time (s)")
    wave_axis.set_ylabel("amplitude")
    wave_axis.legend(fontsize=8)
    # Fixed margins: tight_layout would render every figure once more to measure it.
    figure.subplots_adjust(left=0.1, right=0.95, bottom=0.05, top=0.96, hspace=0.3)
    return figure


def draw_recording(
    name: str,
    recording: dict[str, str],
    score: dict[str, str],
    cluster: dict[str, str],
    spectrum: np.ndarray,
    models: LinearReconstruction | Models,
    layout: Layout,
    audio: dict[str, Any],
    folder: Path,
    raw_dir: Path,
) -> tuple:
    """Draw one recording's comparison figure, write its WAV files; return its index row.

    Runs in worker processes when there are many recordings to draw. Where
    the workers come from joblib they are reused and keep the working folder
    they started in, so ``folder`` and ``raw_dir`` must be absolute.
    """
    try:
        decoded = read_wav(raw_dir / recording["path"])
    except AudioInputError as error:
        raise PipelineError(
            f"cannot reread {RAW_DIR / recording['path']}: {error}; rerun the "
            "fetch stage (dvc repro --force fetch)"
        ) from None
    samples = preprocess(
        decoded, audio["sample_rate"], audio["duration"], audio["smoothing_window"]
    )
    features, scale = compute_features(samples, audio)
    reconstructed = models.reconstruct(spectrum[np.newaxis, :])[0]
    if layout.kind == "fft_magnitude":
        reconstructed_samples = reconstruct_signal(samples, reconstructed, scale)
    else:
        reconstructed_samples = reconstruct_log_signal(samples, features, reconstructed, audio)

    stem = f"{name}_{recording['recording_id']}"
    title = (
        f"{name.replace('_', ' ')}, reconstruction error "
        f"{float(score['reconstruction_error']):.3g} (rank "
        f"{score['reconstruction_error_rank']}), Isolation Forest "
        f"{float(score['isolation_forest_score']):.3f} (rank "
        f"{score['isolation_forest_rank']})"
    )
    if name.startswith("anomaly_"):
        title += f", cluster {cluster['cluster']}"
    figure = draw_comparison(
        recording["recording_id"],
        title,
        layout,
        features,
        reconstructed,
        samples,
        reconstructed_samples,
        audio["sample_rate"],
    )
    save_figure(figure, folder / "figures" / f"{stem}.png")
    # One gain for both files keeps their loudness comparable and audible.
    peak = max(np.abs(samples).max(), np.abs(reconstructed_samples).max())
    gain = LISTENING_PEAK / peak if peak > 0 else 1.0
    write_wav(folder / "audio" / f"{stem}_original.wav", samples * gain, audio["sample_rate"])
    reconstructed_name = f"audio/{stem}_reconstructed.wav"
    write_wav(folder / reconstructed_name, reconstructed_samples * gain, audio["sample_rate"])
    return (
        name,
        recording["recording_id"],
        recording["path"],
        score["reconstruction_error"],
        score["reconstruction_error_rank"],
        score["isolation_forest_score"],
        score["isolation_forest_rank"],
        cluster["cluster"],
        f"figures/{stem}.png",
        f"audio/{stem}_original.wav",
        reconstructed_name,
        round(float(gain), 6),
    )


def inspect(params: dict[str, dict[str, Any]]) -> str:
    """Run the inspect stage with validated parameters; return its summary line."""
    settings = params["inspect"]
    audio = params["spectra"]
    spectra = load_npy(SPECTRA_PATH, mmap=True)
    recordings = read_csv(RECORDINGS_PATH)
    scores = read_csv(SCORES_PATH)
    clusters = read_csv(CLUSTERS_PATH)
    if not len(recordings) == len(scores) == len(clusters) == spectra.shape[0]:
        raise PipelineError(
            "recordings, scores, clusters and spectra disagree in length; rerun the "
            "pipeline (dvc repro)"
        )
    # The figures need the reconstruction only. A PCA is applied from its
    # arrays, without importing scikit-learn; an autoencoder needs its model.
    models = load_reconstruction(MODELS_DIR, spectra.shape[1])
    if models is None:
        from .detect import load_models

        models = load_models(MODELS_DIR, forest=False)
    layout = load_layout()
    selected = select_recordings(scores, clusters, settings["top_n"], settings["rank_by"])
    log.info(
        "inspect: %d anomalies by %s and %d typical cluster members",
        min(settings["top_n"], len(scores)),
        settings["rank_by"],
        len(selected) - min(settings["top_n"], len(scores)),
    )
    jobs = [
        (name, recordings[index], scores[index], clusters[index], np.asarray(spectra[index]))
        for name, index in selected
    ]
    with atomic_directory(OUTPUT_DIR) as folder:
        folder, raw_dir = folder.resolve(), RAW_DIR.resolve()
        if len(jobs) < MIN_PARALLEL_FIGURES or params["compute"]["n_jobs"] == 1:
            index_rows = [
                draw_recording(*job, models, layout, audio, folder, raw_dir)
                for job in tqdm(jobs, desc="inspect", unit="recording", disable=None)
            ]
        else:
            from .parallel import ordered_map
            from .plotting import plt  # noqa: F401  imported once, before the workers fork

            index_rows = list(
                ordered_map(
                    draw_recording,
                    ((*job, models, layout, audio, folder, raw_dir) for job in jobs),
                    params["compute"]["n_jobs"],
                )
            )
        write_csv(
            folder / "index.csv",
            (
                "name",
                "recording_id",
                "path",
                "reconstruction_error",
                "reconstruction_error_rank",
                "isolation_forest_score",
                "isolation_forest_rank",
                "cluster",
                "figure",
                "original_wav",
                "reconstructed_wav",
                "wav_gain",
            ),
            index_rows,
        )
    return f"{len(selected)} figures with original and reconstructed WAV in {OUTPUT_DIR}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the inspect stage."""
    return run_stage(
        "inspect",
        "Draw original and reconstructed spectra and waveforms of the most anomalous "
        "and the most typical recordings, and write both as WAV files.",
        lambda params, options: inspect(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
