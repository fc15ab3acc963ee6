"""Stage ``spectra``: turn every recording into a normalized magnitude spectrum.

Each WAV file under ``data/raw`` is read, downmixed to mono, resampled to
``spectra.sample_rate`` Hz, padded or trimmed to ``spectra.duration``
seconds, smoothed with a moving average of ``spectra.smoothing_window``
samples, transformed with the real FFT, and divided by its maximum
magnitude. Files that cannot be used are listed in ``data/rejected.csv``
with the reason, never dropped silently.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections import Counter
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from .audio import MAX_SAMPLE_RATE, MIN_SAMPLE_RATE, decode_wav, window_length
from .cli import exit_with, run_stage
from .errors import AudioInputError, PipelineError
from .features import Layout, recording_features
from .features import layout as feature_layout
from .metadata import COLUMNS as METADATA_COLUMNS
from .metadata import METADATA_FILE, empty_speaker, read_metadata
from .outputs import RowWriter, write_csv, write_json, write_npy

log = logging.getLogger(__name__)

RAW_DIR = Path("data/raw")
SPECTRA_PATH = Path("data/spectra.npy")
FREQUENCIES_PATH = Path("data/frequencies.npy")
FEATURES_PATH = Path("data/features.json")
# Most features per recording: 4 bytes each, 3,000 recordings then take
# 0.8 GB in data/spectra.npy, and the detectors hold several such matrices.
MAX_FEATURES = 65_536
# Share of the log bands that may repeat a neighbour before the stage warns.
REPEATED_BANDS_WARNING = 0.25
RECORDINGS_PATH = Path("data/recordings.csv")
REJECTED_PATH = Path("data/rejected.csv")
DATA_METRICS_PATH = Path("metrics/data.json")
RECORDING_NAME = re.compile(r"(?P<digit>\d)_(?P<speaker>\d+)_(?P<repetition>\d+)")

RECORDING_COLUMNS = (
    "recording_id",
    "path",
    "speaker",
    "repetition",
    "duration_s",
    "sample_rate_hz",
    "channels",
    "encoding",
    "peak_amplitude",
    "trimmed",
    "magnitude_max",
) + METADATA_COLUMNS


@dataclass
class SpectraResult:
    """Spectra of the usable recordings and the bookkeeping of all files.

    Attributes
    ----------
    spectra : np.ndarray [shape=(n_recordings, n_frequencies), dtype=float32]
    frequencies : np.ndarray [shape=(n_frequencies,)]
        Frequency of each column in Hz.
    recordings : list of dict
        One row per spectrum, in the same order, with ``RECORDING_COLUMNS``.
    rejected : list of (str, str)
        Path and reason of every file that was not used.
    layout : Layout
        Feature kind and how columns map to frequencies and time frames.
    """

    spectra: np.ndarray
    frequencies: np.ndarray
    recordings: list[dict[str, Any]]
    rejected: list[tuple[str, str]] = field(default_factory=list)
    layout: Layout | None = None


def recording_files(raw_dir: Path) -> list[Path]:
    """Return every file below ``raw_dir`` that may be a recording, sorted.

    Sorting is by speaker, repetition and then path, so the row order does
    not depend on the file system.
    """
    paths = [
        path
        for path in raw_dir.rglob("*")
        if path.is_file() and path.name not in (METADATA_FILE, "SHA256SUMS")
        and not path.name.startswith(".")
    ]

    return sorted(paths, key=_file_order)


def _file_order(path: Path) -> tuple:
    match = RECORDING_NAME.fullmatch(path.stem)
    if match:
        return (0, int(match["speaker"]), int(match["repetition"]), path.as_posix())
    return (1, 0, 0, path.as_posix())


# Files per task sent to a worker process: large enough that the transfer
# and scheduling cost per file is small, small enough to balance 2 cores.
CHUNK_FILES = 128
# Reason given by a worker for a listed file that it cannot find.
MISSING = "file not found"
# Below this many files the worker start-up costs more than it saves.
MIN_PARALLEL_FILES = 512
# How long to wait for a Dask scheduler before giving up, in seconds.
DASK_CONNECT_TIMEOUT = 15.0
# While no worker is connected, wait this long (seconds) for one to appear.
DASK_NO_WORKERS_TIMEOUT = 60.0
DASK_POLL_SECONDS = 2.0


@dataclass
class Analysed:
    """What a worker learned about one file.

    Attributes
    ----------
    digest : str or None
        SHA-256 of the content; None when the file could not be read.
    reason : str or None
        Why the file cannot be used; None when it can.
    features : np.ndarray or None [dtype=float32]
    scale : float
        Normalization factor of the features.
    info : dict
        Duration, sample rate, channels, encoding and peak of the recording.
    """

    digest: str | None
    reason: str | None = None
    features: np.ndarray | None = None
    scale: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def analyse_files(paths: list[str], feature_settings: dict[str, Any]) -> list[Analysed]:
    """Read, decode and compute the features of each file; runs in a worker.

    Parameters
    ----------
    paths : list of str
        Absolute paths.
    feature_settings : dict
        The ``spectra`` section with ``sample_rate``, ``duration`` and
        ``smoothing_window`` filled in.

    Returns
    -------
    list of Analysed
        One per path, in the same order.
    """
    results = []
    for path in paths:
        try:
            content = Path(path).read_bytes()
        except FileNotFoundError:
            results.append(Analysed(None, MISSING))
            continue
        except OSError as error:
            results.append(Analysed(None, f"cannot read file: {error.strerror or error}"))
            continue
        digest = hashlib.sha256(content).hexdigest()
        try:
            recording = decode_wav(content)
            features, scale = recording_features(recording, feature_settings)
        except AudioInputError as error:
            results.append(Analysed(digest, str(error)))
            continue
        info = {
            "duration_s": round(recording.duration, 6),
            "sample_rate_hz": recording.sample_rate,
            "channels": recording.channels,
            "encoding": recording.encoding,
            "peak_amplitude": round(float(np.max(np.abs(recording.samples))), 6),
            "trimmed": recording.duration > feature_settings["duration"],
        }
        results.append(Analysed(digest, None, features.astype(np.float32), scale, info))
    return results


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def _analysed_in_order(
    paths: list[str],
    feature_settings: dict[str, Any],
    n_jobs: int,
    dask_scheduler: str,
) -> Iterator[Analysed]:
    """Yield the analysis of every path in order, computed where configured.

    The same function runs in this process, in joblib worker processes, or
    on the workers of a Dask cluster; each file is computed independently,
    so the results do not depend on where or in how many parts they ran.
    At most a few chunks are in flight, which bounds the memory.
    """
    chunks = _chunks(paths, CHUNK_FILES)
    if dask_scheduler:
        results = _dask_results(dask_scheduler, chunks, feature_settings)
    elif n_jobs == 1 or len(paths) < MIN_PARALLEL_FILES:
        results = _analysed_here(chunks, feature_settings)
    else:
        from .parallel import ordered_map

        results = ordered_map(
            analyse_files, ((chunk, feature_settings) for chunk in chunks), n_jobs
        )
    for chunk_results in results:
        yield from chunk_results


def _analysed_here(
    chunks: list[list[str]], feature_settings: dict[str, Any]
) -> Iterator[list[Analysed]]:
    """Analyse the chunks in this process with one BLAS thread, as a worker does.

    The band pooling's matrix products are small, so a second BLAS thread
    mostly waits. On the 3,000 real recordings, two threads took about twice
    the CPU time of one.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        for chunk in chunks:
            yield analyse_files(chunk, feature_settings)


def _connect(client_class: type, address: str, advice: str) -> Any:
    """Connect a Dask client, giving up after ``DASK_CONNECT_TIMEOUT`` seconds.

    The client's own timeout covers an address where nothing listens, but a
    server of another kind (an HTTP server, for example) accepts the
    connection and never completes the handshake, and the client then waits
    for ever. So the client is created in a thread that is abandoned on
    timeout. It is a daemon thread, so it does not keep the stage from ending.
    """
    import threading

    outcome: dict[str, Any] = {}

    def connect() -> None:
        try:
            outcome["client"] = client_class(
                address, timeout=f"{DASK_CONNECT_TIMEOUT:.0f}s", set_as_default=False
            )
        except Exception as error:  # reported by the stage below
            outcome["error"] = error

    thread = threading.Thread(target=connect, name="dask-connect", daemon=True)
    thread.start()
    thread.join(DASK_CONNECT_TIMEOUT + 5)
    if "client" in outcome:
        return outcome["client"]
    error = outcome.get("error")
    if error is None:
        reason = (
            f"no Dask scheduler answered within {DASK_CONNECT_TIMEOUT + 5:.0f} s; "
            "the address may belong to a server of another kind"
        )
    else:
        reason = f"{type(error).__name__}: {error}"
    raise PipelineError(
        f"cannot reach the Dask scheduler at {address} (compute.dask_scheduler): "
        f"{reason}. {advice}"
    )


def _dask_results(
    address: str, chunks: list[list[str]], feature_settings: dict[str, Any]
) -> Iterator[list[Analysed]]:
    """Run `analyse_files` on a Dask cluster, a bounded window of chunks at a time.

    Raises
    ------
    PipelineError
        If the scheduler cannot be reached, has had no workers for
        ``DASK_NO_WORKERS_TIMEOUT`` seconds, or goes away during the run.
    """
    from collections import deque

    try:
        from distributed import Client
    except ImportError:
        raise PipelineError(
            "compute.dask_scheduler is set but the package distributed is not "
            "installed; install it (pip install -r requirements.txt) or set "
            'compute.dask_scheduler to ""'
        ) from None
    advice = (
        "Start the scheduler and its workers, or set compute.dask_scheduler to \"\" "
        "to compute on this machine."
    )
    client = _connect(Client, address, advice)
    # A lost scheduler is reported below in one message; the client would log
    # the connection's traceback first.
    client_log = logging.getLogger("distributed.client")
    level = client_log.level
    client_log.setLevel(logging.CRITICAL)
    with client, contextlib.ExitStack() as restore:
        restore.callback(client_log.setLevel, level)
        pending: deque = deque()

        def next_result() -> list[Analysed]:
            future = pending.popleft()
            idle_since = time.monotonic()
            while True:
                try:
                    return future.result(timeout=DASK_POLL_SECONDS)
                except TimeoutError:
                    if client.nthreads():
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since > DASK_NO_WORKERS_TIMEOUT:
                        raise PipelineError(
                            f"the Dask scheduler at {address} (compute.dask_scheduler) "
                            f"has had no workers for {DASK_NO_WORKERS_TIMEOUT:.0f} s. {advice}"
                        ) from None

        try:
            window = max(2, 2 * sum(client.nthreads().values()))
            for chunk in chunks:
                pending.append(client.submit(analyse_files, chunk, feature_settings, pure=False))
                if len(pending) >= window:
                    yield next_result()
            while pending:
                yield next_result()
        except (CancelledError, OSError) as error:
            raise PipelineError(
                f"lost the Dask scheduler at {address} (compute.dask_scheduler) during "
                f"the run: {type(error).__name__} {error}. {advice}"
            ) from None


def compute_spectra(
    raw_dir: Path,
    digit: int,
    sample_rate: int,
    duration: float,
    smoothing_window: int,
    feature_settings: dict[str, Any] | None = None,
    *,
    n_jobs: int = 1,
    dask_scheduler: str = "",
    spectra_path: Path | None = None,
) -> SpectraResult:
    """Compute the features of every usable recording below ``raw_dir``.

    Parameters
    ----------
    raw_dir : Path
        Folder in the upstream ``data/`` layout.
    digit : int
        Digit whose recordings are expected; files named for another digit
        are rejected.
    sample_rate : int
        Analysis sample rate in Hz.
    duration : float
        Analysis window in seconds.
    smoothing_window : int
        Moving-average length in samples.
    feature_settings : dict, optional
        The ``spectra`` section of ``params.yaml``, which selects the feature
        kind; without it the features are the normalized FFT magnitude.
    n_jobs : int
        Worker processes; -1 uses every core.
    dask_scheduler : str
        Address of a Dask scheduler whose workers compute the features
        instead; empty computes them on this machine.
    spectra_path : Path, optional
        Write the features to this ``.npy`` file as they arrive, so they are
        never all in memory; ``SpectraResult.spectra`` is then a read-only
        memory map of the file. Without it they are returned in memory.

    Returns
    -------
    SpectraResult
    """
    feature_settings = dict(
        feature_settings or {"kind": "fft_magnitude"},
        sample_rate=sample_rate,
        duration=duration,
        smoothing_window=smoothing_window,
    )
    metadata = read_metadata(raw_dir / METADATA_FILE)
    columns = feature_layout(feature_settings, window_length(sample_rate, duration))
    rows: list[dict[str, Any]] = []
    rejected: list[tuple[str, str]] = []
    candidates: list[tuple[Path, re.Match]] = []
    for path in recording_files(raw_dir):
        relative = path.relative_to(raw_dir).as_posix()
        match = RECORDING_NAME.fullmatch(path.stem)
        if path.suffix.lower() != ".wav" or not match:
            rejected.append(
                (relative, "name does not follow {digit}_{speaker}_{repetition}.wav")
            )
        elif int(match["digit"]) != digit:
            rejected.append((relative, f"recording of digit {match['digit']}, not {digit}"))
        else:
            candidates.append((path, match))

    # An id or a content counts as seen once a recording with it was used.
    seen_ids: set[str] = set()
    seen_content: dict[str, str] = {}
    # 6_02_7.wav and 6_02_007.wav name the same take: speaker 02, repetition 7.
    seen_takes: dict[tuple[str, int], str] = {}
    missing_metadata: set[str] = set()
    # Absolute paths, so workers started in another folder find the files.
    root = raw_dir.resolve()
    analysed = _analysed_in_order(
        [str(root / path.relative_to(raw_dir)) for path, _ in candidates],
        feature_settings,
        n_jobs,
        dask_scheduler,
    )
    with RowWriter(spectra_path, columns.n_features) as writer:
        progress = tqdm(
            zip(candidates, analysed),
            total=len(candidates),
            desc="spectra",
            unit="file",
            disable=None,
        )
        for (path, match), result in progress:
            relative = path.relative_to(raw_dir).as_posix()
            if result.reason == MISSING:
                # The file was listed a moment ago, so it is not a bad recording.
                where = "a Dask worker" if dask_scheduler else "a worker process"
                raise PipelineError(
                    f"{where} could not find {path.resolve()}, which is in {raw_dir}"
                    + (
                        "; Dask workers must see data/raw at the same path as this "
                        "machine (a shared file system)"
                        if dask_scheduler
                        else "; was the folder changed during the run? Rerun the stage"
                    )
                )
            if path.stem in seen_ids:
                rejected.append((relative, f"duplicate recording id {path.stem}"))
                continue
            if result.digest is not None and result.digest in seen_content:
                rejected.append((relative, f"identical content to {seen_content[result.digest]}"))
                continue
            if result.reason is not None:
                rejected.append((relative, result.reason))
                continue
            speaker = match["speaker"].zfill(2)
            take = (speaker, int(match["repetition"]))
            if take in seen_takes:
                rejected.append((relative, f"same speaker and repetition as {seen_takes[take]}"))
                continue
            seen_ids.add(path.stem)
            seen_content[result.digest] = relative
            seen_takes[take] = relative
            folder = path.parent.relative_to(raw_dir).as_posix()
            if folder != speaker:
                log.warning(
                    "spectra: %s is in folder '%s', not in the folder of speaker %s; "
                    "used with the speaker from its name",
                    relative,
                    folder,
                    speaker,
                )
            if speaker not in metadata:
                missing_metadata.add(speaker)
            row = {
                "recording_id": path.stem,
                "path": relative,
                "speaker": speaker,
                "repetition": int(match["repetition"]),
                **result.info,
                "magnitude_max": result.scale,
            }
            row.update(metadata.get(speaker, empty_speaker()))
            rows.append(row)
            writer.append(result.features)
        matrix = writer.finish()

    rejected.sort(key=lambda item: _file_order(raw_dir / item[0]))
    for speaker in sorted(missing_metadata):
        log.warning("spectra: speaker %s has no metadata entry; metadata left empty", speaker)
    for relative, reason in rejected:
        log.warning("spectra: rejected %s: %s", relative, reason)
    return SpectraResult(matrix, columns.frequencies, rows, rejected, columns)


def data_metrics(result: SpectraResult) -> dict[str, Any]:
    """Count recordings found, used, rejected (by reason) and converted."""
    reasons = Counter(_reason_kind(reason) for _, reason in result.rejected)
    rows = result.recordings
    return {
        "found": len(rows) + len(result.rejected),
        "used": len(rows),
        "rejected": len(result.rejected),
        "rejected_by_reason": dict(sorted(reasons.items())),
        "trimmed": sum(1 for row in rows if row["trimmed"]),
        "downmixed": sum(1 for row in rows if row["channels"] > 1),
        "sample_rates_hz": dict(
            sorted(Counter(str(row["sample_rate_hz"]) for row in rows).items())
        ),
        "outside_speaker_folder": sum(
            1 for row in rows if row["path"].rsplit("/", 1)[0] != row["speaker"]
        ),
        "speakers": len({row["speaker"] for row in rows}),
        "speakers_without_metadata": len(
            {row["speaker"] for row in rows if row["gender"] == ""}
        ),
    }


def _reason_kind(reason: str) -> str:
    """Group a rejection reason by its text before any file-specific detail."""
    if reason.startswith("identical content"):
        return "duplicate content"
    if reason.startswith("recording of digit"):
        return "other digit"
    if reason.startswith("same speaker and repetition"):
        return "same speaker and repetition"
    if reason.startswith("sample rate ") and " is below " in reason:
        return f"sample rate below {MIN_SAMPLE_RATE} Hz"
    if reason.startswith("sample rate ") and " is above " in reason:
        return f"sample rate above {MAX_SAMPLE_RATE} Hz"
    return re.split(r" \(|:", reason, maxsplit=1)[0]


def write_outputs(result: SpectraResult, settings: dict[str, Any]) -> None:
    """Write the spectra stage outputs atomically.

    The spectra themselves are written while they are computed (see
    `compute_spectra`). ``data/features.json`` also keeps the ``spectra``
    settings, so that new recordings can be scored with the same ones.
    """
    write_npy(FREQUENCIES_PATH, result.frequencies)
    write_json(FEATURES_PATH, {**result.layout.to_json(), "settings": settings})
    write_csv(
        RECORDINGS_PATH,
        RECORDING_COLUMNS,
        ([row[column] for column in RECORDING_COLUMNS] for row in result.recordings),
    )
    write_csv(REJECTED_PATH, ("path", "reason"), result.rejected)
    write_json(DATA_METRICS_PATH, data_metrics(result))


def _warn_repeated_bands(settings: dict[str, Any], length: int) -> None:
    """Warn when many log bands are narrower than the FFT bin spacing.

    Such a band takes the bin nearest to its centre, so neighbouring narrow
    bands repeat the same value and add columns without information. With
    the defaults, 4 of the 48 bands, all below 130 Hz, do so.
    """
    from .features import _pooling_matrix, band_edges

    if settings["kind"] == "log_bands":
        frame = length
    else:
        frame = 2 * (length // settings["n_frames"])
    bins = np.fft.rfftfreq(frame, d=1.0 / settings["sample_rate"])
    pooling = _pooling_matrix(bins, band_edges(settings))
    distinct = np.unique(pooling.T, axis=0).shape[0]
    repeated = pooling.shape[1] - distinct
    if repeated > REPEATED_BANDS_WARNING * pooling.shape[1]:
        log.warning(
            "spectra: %d of the %d bands repeat a neighbouring band, because their "
            "frames of %d samples give FFT bins %.0f Hz apart; lower spectra.n_frames "
            "or spectra.n_bands, or raise spectra.min_frequency_hz",
            repeated,
            pooling.shape[1],
            frame,
            settings["sample_rate"] / frame,
        )


def spectra(params: dict[str, dict[str, Any]]) -> str:
    """Run the spectra stage with validated parameters; return its summary line."""
    settings = params["spectra"]
    length = window_length(settings["sample_rate"], settings["duration"])
    if settings["smoothing_window"] > length:
        raise PipelineError(
            f"spectra.smoothing_window ({settings['smoothing_window']} samples) is "
            f"longer than the analysis window ({length} samples = spectra.duration x "
            "spectra.sample_rate); lower it or lengthen spectra.duration."
        )
    if settings["kind"] != "fft_magnitude":
        nyquist = settings["sample_rate"] / 2
        if settings["max_frequency_hz"] > nyquist:
            raise PipelineError(
                f"spectra.max_frequency_hz ({settings['max_frequency_hz']:g} Hz) is above "
                f"half of spectra.sample_rate ({nyquist:g} Hz); lower it or raise the "
                "sample rate."
            )
        if settings["min_frequency_hz"] >= settings["max_frequency_hz"]:
            raise PipelineError(
                "spectra.min_frequency_hz must be below spectra.max_frequency_hz, got "
                f"{settings['min_frequency_hz']:g} and {settings['max_frequency_hz']:g} Hz."
            )
        if settings["kind"] == "log_tf" and 2 * settings["n_frames"] > length:
            raise PipelineError(
                f"spectra.n_frames = {settings['n_frames']} leaves frames shorter than "
                f"2 samples in a window of {length} samples; lower it."
            )
        _warn_repeated_bands(settings, length)
    n_features = feature_layout(settings, length).n_features
    if n_features > MAX_FEATURES:
        hint = (
            "spectra.n_bands x spectra.n_frames"
            if settings["kind"] == "log_tf"
            else "spectra.sample_rate x spectra.duration"
        )
        raise PipelineError(
            f"the spectra settings give {n_features} features per recording, more than "
            f"{MAX_FEATURES}; every stage would hold matrices of that width. Lower {hint}."
        )
    if not RAW_DIR.is_dir():
        raise PipelineError(f"{RAW_DIR} not found; run the fetch stage first (dvc repro)")
    log.info(
        "spectra: reading %s, %s features at %d Hz, %.3f s window, smoothing %d",
        RAW_DIR,
        settings["kind"],
        settings["sample_rate"],
        settings["duration"],
        settings["smoothing_window"],
    )
    result = compute_spectra(
        RAW_DIR,
        params["data"]["digit"],
        settings["sample_rate"],
        settings["duration"],
        settings["smoothing_window"],
        settings,
        n_jobs=params["compute"]["n_jobs"],
        dask_scheduler=params["compute"]["dask_scheduler"],
        spectra_path=SPECTRA_PATH,
    )
    if not result.recordings:
        raise PipelineError(
            f"no usable recordings in {RAW_DIR}: all {len(result.rejected)} files were "
            f"rejected; see the warnings above"
        )
    write_outputs(result, params["spectra"])
    return (
        f"{len(result.recordings)} recordings x {result.spectra.shape[1]} {settings['kind']} "
        "features, "
        f"{len(result.rejected)} files rejected (see {REJECTED_PATH})"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the spectra stage."""
    return run_stage(
        "spectra",
        "Compute the features (spectra.kind: log-power bands over time frames by "
        "default) of every recording in data/raw.",
        lambda params, options: spectra(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
