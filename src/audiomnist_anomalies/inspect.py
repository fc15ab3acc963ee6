"""Stage ``inspect``: figures and audio of the most anomalous and most typical recordings.

For the ``inspect.top_n`` recordings with the highest anomaly score, and
for the recording nearest to the centre of each cluster, the stage draws
the original and PCA-reconstructed spectrum, their difference, and the
original and reconstructed waveform. The reconstructed waveform is the
inverse FFT of the reconstructed magnitude with the original phase,
rescaled by the recording's normalization factor. Both waveforms are
written as WAV files so that a person can listen to them: figures go to
``plots/inspect/figures`` (declared as DVC plots), sound to
``plots/inspect/audio``, and ``plots/inspect/index.csv`` lists them all.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from .audio import preprocess, read_wav, reconstruct_signal, magnitude_spectrum
from .cli import exit_with, run_stage
from .detect import load_models, reconstruct
from .errors import AudioInputError, PipelineError
from .outputs import (
    atomic_directory,
    load_npy,
    read_csv,
    save_figure,
    write_csv,
    write_wav,
)

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
    frequencies: np.ndarray,
    spectrum: np.ndarray,
    reconstructed_spectrum: np.ndarray,
    samples: np.ndarray,
    reconstructed_samples: np.ndarray,
    sample_rate: int,
):
    """Draw spectra, their difference and waveforms of one recording."""
    from .plotting import plt

    figure, axes = plt.subplots(3, 1, figsize=(9, 9))
    axes[0].plot(frequencies, spectrum, lw=0.7, label="original")
    axes[0].plot(frequencies, reconstructed_spectrum, lw=0.7, label="PCA reconstruction")
    axes[0].set_xlabel("frequency (Hz)")
    axes[0].set_ylabel("magnitude / maximum")
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"{recording_id}: {title}")

    difference = spectrum - reconstructed_spectrum
    axes[1].plot(frequencies, difference, lw=0.7, color="tab:red")
    axes[1].axhline(0, color="black", lw=0.5)
    axes[1].set_xlabel("frequency (Hz)")
    axes[1].set_ylabel("original - reconstruction")

    time = np.arange(samples.shape[0]) / sample_rate
    axes[2].plot(time, samples, lw=0.6, label="original (preprocessed)")
    axes[2].plot(time, reconstructed_samples, lw=0.6, alpha=0.8, label="reconstruction")
    axes[2].set_xlabel("time (s)")
    axes[2].set_ylabel("amplitude")
    axes[2].legend(fontsize=8)
    figure.tight_layout()
    return figure


def inspect(params: dict[str, dict[str, Any]]) -> str:
    """Run the inspect stage with validated parameters; return its summary line."""
    settings = params["inspect"]
    audio = params["spectra"]
    spectra = load_npy(SPECTRA_PATH)
    frequencies = load_npy(FREQUENCIES_PATH)
    recordings = read_csv(RECORDINGS_PATH)
    scores = read_csv(SCORES_PATH)
    clusters = read_csv(CLUSTERS_PATH)
    if not len(recordings) == len(scores) == len(clusters) == spectra.shape[0]:
        raise PipelineError(
            "recordings, scores, clusters and spectra disagree in length; rerun the "
            "pipeline (dvc repro)"
        )
    _, pca, _ = load_models(MODELS_DIR)
    selected = select_recordings(scores, clusters, settings["top_n"], settings["rank_by"])
    log.info(
        "inspect: %d anomalies by %s and %d typical cluster members",
        min(settings["top_n"], len(scores)),
        settings["rank_by"],
        len(selected) - min(settings["top_n"], len(scores)),
    )
    index_rows = []
    with atomic_directory(OUTPUT_DIR) as folder:
        for name, index in tqdm(selected, desc="inspect", unit="recording", disable=None):
            recording = recordings[index]
            score = scores[index]
            try:
                decoded = read_wav(RAW_DIR / recording["path"])
            except AudioInputError as error:
                raise PipelineError(
                    f"cannot reread {RAW_DIR / recording['path']}: {error}; rerun the "
                    "fetch stage (dvc repro --force fetch)"
                ) from None
            samples = preprocess(
                decoded, audio["sample_rate"], audio["duration"], audio["smoothing_window"]
            )
            spectrum, maximum = magnitude_spectrum(samples)
            reconstructed = reconstruct(pca, spectra[index : index + 1].astype(np.float64))[0]
            reconstructed_samples = reconstruct_signal(samples, reconstructed, maximum)

            stem = f"{name}_{recording['recording_id']}"
            title = (
                f"{name.replace('_', ' ')}, reconstruction error "
                f"{float(score['reconstruction_error']):.3g} (rank "
                f"{score['reconstruction_error_rank']}), Isolation Forest "
                f"{float(score['isolation_forest_score']):.3f} (rank "
                f"{score['isolation_forest_rank']})"
            )
            if name.startswith("anomaly_"):
                title += f", cluster {clusters[index]['cluster']}"
            figure = draw_comparison(
                recording["recording_id"],
                title,
                frequencies,
                spectrum,
                reconstructed,
                samples,
                reconstructed_samples,
                audio["sample_rate"],
            )
            save_figure(figure, folder / "figures" / f"{stem}.png")
            # One gain for both files keeps their loudness comparable and audible.
            peak = max(np.abs(samples).max(), np.abs(reconstructed_samples).max())
            gain = LISTENING_PEAK / peak if peak > 0 else 1.0
            write_wav(
                folder / "audio" / f"{stem}_original.wav", samples * gain, audio["sample_rate"]
            )
            write_wav(
                folder / "audio" / f"{stem}_reconstructed.wav",
                reconstructed_samples * gain,
                audio["sample_rate"],
            )
            index_rows.append(
                (
                    name,
                    recording["recording_id"],
                    recording["path"],
                    score["reconstruction_error"],
                    score["reconstruction_error_rank"],
                    score["isolation_forest_score"],
                    score["isolation_forest_rank"],
                    clusters[index]["cluster"],
                    f"figures/{stem}.png",
                    f"audio/{stem}_original.wav",
                    f"audio/{stem}_reconstructed.wav",
                    round(float(gain), 6),
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
