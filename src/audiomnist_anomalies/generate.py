"""Generate a larger data set in the upstream layout from real recordings.

The pipeline is benchmarked at sizes such as 30,000 and 100,000
recordings, but AudioMNIST has 3,000 recordings of each digit. This
command writes ``--count`` recordings of one digit as
``OUT/{speaker}/{digit}_{speaker}_{repetition}.wav`` with 50 repetitions
per speaker (the last speaker may have fewer), plus ``audioMNIST_meta.txt``.
Run it from any folder::

    python -m audiomnist_anomalies.generate --source AudioMNIST/data \\
        --out /tmp/gen30k --count 30000

and point ``data.source`` at the output folder.

Generated speakers are numbered 01, 02, ... (``100`` and above without
padding). Generated speaker ``k`` derives from the ``k``-th source speaker
in numeric order, cycling through the source speakers, and gets a copy of
that speaker's metadata entry. Its repetition ``r`` derives from the source
repetition ``r``, or from a seeded choice among the speaker's repetitions
when ``r`` is missing. Every file, the first copy of each source speaker
included, is varied in three ways:

- a time shift of up to 5 ms: silence added at the start, or samples
  trimmed from the start (never wrapped around), so the length changes;
- white noise 35 to 60 dB below the RMS of the source recording;
- a gain of -6 to +3 dB, lowered when needed so that the peak stays at or
  below 0.98 of full scale, so no sample clips.

The variations come from ``numpy.random.default_rng`` seeded with
``(seed, speaker, repetition)``, so the output is byte-for-byte the same
for the same arguments, whatever ``--workers`` and the order of work. The
output is 16-bit PCM mono WAV at the sample rate of the source file.

Every file is written to a temporary name and renamed, so an interrupted
run leaves only complete files. The output folder must be empty or a
previous output written with the same arguments, which the file
``.generated.json`` records. A rerun renders every file again, keeps the
files whose bytes already match and writes the others, so it completes an
interrupted run and repairs changed files. The marker name starts with a
dot, so the spectra stage skips it like other hidden files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import struct
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .audio import read_wav
from .cli import EXIT_USER_ERROR, configure_logging, interrupted_status, terminate
from .errors import AudioInputError, ParameterError, PipelineError
from .fetch import RECORDING_NAME
from .metadata import METADATA_FILE
from .outputs import write_bytes, write_json, write_text

log = logging.getLogger("audiomnist_anomalies.generate")

MARKER_FILE = ".generated.json"
REPETITIONS_PER_SPEAKER = 50
GAIN_DB_RANGE = (-6.0, 3.0)
NOISE_DB_BELOW_RMS_RANGE = (35.0, 60.0)
MAX_SHIFT_SECONDS = 0.005
# Fraction of full scale that the gain may raise the peak to.
PEAK_LIMIT = 0.98
# 16-bit PCM: read_wav divides by 2**15, so multiplying by it restores the integers.
PCM16_SCALE = 32768.0
PROGRESS_STEPS = 10


@dataclass(frozen=True)
class SpeakerPlan:
    """The recordings to generate for one speaker.

    Attributes
    ----------
    number : int
        Generated speaker number, from 1.
    source_speaker : str
        Speaker id in the source folder that the recordings derive from.
    repetitions : int
        Number of recordings, at most `REPETITIONS_PER_SPEAKER`.
    """

    number: int
    source_speaker: str
    repetitions: int

    @property
    def speaker_id(self) -> str:
        """Speaker id as used in folder and file names: 01..99, then 100, 101, ..."""
        return format_speaker_id(self.number)


@dataclass(frozen=True)
class SpeakerTask:
    """Everything a worker process needs to write one speaker's recordings.

    Attributes
    ----------
    plan : SpeakerPlan
    sources : dict of int to str
        Path of each source recording of the source speaker, by repetition.
    digit : int
    seed : int
    output : str
        Output folder.
    """

    plan: SpeakerPlan
    sources: dict[int, str]
    digit: int
    seed: int
    output: str


@dataclass(frozen=True)
class Variation:
    """The random changes applied to one source recording.

    Attributes
    ----------
    gain_db : float
        Drawn gain in dB, before the peak limit.
    shift : int
        Samples of silence added at the start if positive, or samples
        trimmed from the start if negative.
    noise_db : float
        Level of the white noise in dB below the source RMS.
    """

    gain_db: float
    shift: int
    noise_db: float


def format_speaker_id(number: int) -> str:
    """Return the speaker id of a speaker number, zero-padded to two digits."""
    return f"{number:02d}"


def plan_speakers(count: int, source_speakers: list[str]) -> list[SpeakerPlan]:
    """Split ``count`` recordings into speakers of 50 repetitions each.

    Generated speaker ``k`` (from 1) derives from source speaker
    ``source_speakers[(k - 1) % len(source_speakers)]``.
    """
    n_speakers = math.ceil(count / REPETITIONS_PER_SPEAKER)
    plans = []
    for index in range(n_speakers):
        remaining = count - index * REPETITIONS_PER_SPEAKER
        plans.append(
            SpeakerPlan(
                number=index + 1,
                source_speaker=source_speakers[index % len(source_speakers)],
                repetitions=min(REPETITIONS_PER_SPEAKER, remaining),
            )
        )
    return plans


def find_source_recordings(source: Path, digit: int) -> dict[str, dict[int, Path]]:
    """Find the recordings of ``digit`` in the speaker folders of ``source``.

    Returns
    -------
    dict of str to dict of int to Path
        Recording paths by speaker id (as in the file name) and repetition,
        with speakers in numeric order. If a speaker and repetition occur in
        two folders, the first path in sorted order is used.

    Raises
    ------
    ParameterError
        If ``source`` is not a folder or contains no recordings of ``digit``.
    """
    if not source.is_dir():
        problem = "is not a folder" if source.exists() else "not found"
        raise ParameterError(
            f"source folder {str(source)!r} {problem}. Give a folder in the upstream "
            "data/ layout ({speaker}/{digit}_{speaker}_{repetition}.wav and "
            f"{METADATA_FILE})."
        )
    recordings: dict[str, dict[int, Path]] = {}
    for path in sorted(source.glob("*/*.wav")):
        match = RECORDING_NAME.fullmatch(path.name)
        if not match or int(match["digit"]) != digit or not path.is_file():
            continue
        speaker = match["speaker"]
        recordings.setdefault(speaker, {}).setdefault(int(match["repetition"]), path)
    if not recordings:
        raise ParameterError(
            f"source folder {str(source)!r} has no recordings of digit {digit}; "
            f"expected files such as 01/{digit}_01_0.wav"
        )
    ordered = sorted(recordings, key=lambda speaker: (int(speaker), speaker))
    return {speaker: recordings[speaker] for speaker in ordered}


def read_source_metadata(source: Path) -> dict[str, Any]:
    """Read the source metadata file, keyed by two-digit speaker id.

    A missing file gives an empty mapping and a warning, because the
    pipeline runs without metadata.

    Raises
    ------
    ParameterError
        If the file exists but is not a JSON object.
    """
    path = source / METADATA_FILE
    if not path.is_file():
        log.warning("generate: %s not found; the output metadata file will be empty", path)
        return {}
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ParameterError(
            f"cannot read metadata file {path}: {error}; fix it or remove it"
        ) from None
    if not isinstance(raw, dict):
        raise ParameterError(
            f"metadata file {path} is not a JSON object; fix it or remove it"
        )
    return {str(speaker).strip().zfill(2): fields for speaker, fields in raw.items()}


def build_metadata(
    plans: list[SpeakerPlan], source_metadata: dict[str, Any]
) -> dict[str, Any]:
    """Copy each source speaker's metadata entry to the speakers derived from it.

    Source speakers without an entry are logged once and their generated
    speakers get no entry, as in the source.
    """
    entries = {}
    missing = set()
    for plan in plans:
        entry = source_metadata.get(plan.source_speaker.zfill(2))
        if entry is None:
            missing.add(plan.source_speaker)
            continue
        entries[plan.speaker_id] = entry
    for speaker in sorted(missing):
        log.warning("generate: source speaker %s has no metadata entry", speaker)
    return entries


def draw_variation(rng: np.random.Generator, sample_rate: int) -> Variation:
    """Draw the gain, time shift and noise level of one recording."""
    max_shift = int(round(MAX_SHIFT_SECONDS * sample_rate))
    return Variation(
        gain_db=float(rng.uniform(*GAIN_DB_RANGE)),
        shift=int(rng.integers(-max_shift, max_shift + 1)),
        noise_db=float(rng.uniform(*NOISE_DB_BELOW_RMS_RANGE)),
    )


def apply_variation(
    samples: np.ndarray, variation: Variation, rng: np.random.Generator
) -> np.ndarray:
    """Shift, add noise to and amplify a recording.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,), dtype=float64]
        Source recording scaled to [-1, 1).
    variation : Variation
    rng : np.random.Generator
        Source of the noise samples.

    Returns
    -------
    np.ndarray [shape=(n + variation.shift,), dtype=int16]
        16-bit PCM samples with peak at most `PEAK_LIMIT` of full scale. A
        trim is capped at half the recording, which only matters for
        recordings shorter than 10 ms.
    """
    if variation.shift >= 0:
        shifted = np.concatenate([np.zeros(variation.shift), samples])
    else:
        shifted = samples[min(-variation.shift, samples.shape[0] // 2) :]
    rms = float(np.sqrt(np.mean(samples**2)))
    noise_level = rms * 10.0 ** (-variation.noise_db / 20.0)
    noisy = shifted + noise_level * rng.standard_normal(shifted.shape[0])
    peak = float(np.max(np.abs(noisy)))
    gain = min(10.0 ** (variation.gain_db / 20.0), PEAK_LIMIT / peak)
    return np.round(noisy * gain * PCM16_SCALE).astype("<i2")


def pcm16_wav_bytes(samples: np.ndarray, sample_rate: int) -> bytes:
    """Encode 16-bit mono samples as a canonical 44-byte-header RIFF/WAVE file."""
    data = np.ascontiguousarray(samples, dtype="<i2").tobytes()
    header = struct.pack(
        "<4sI4s4sIHHIIHH4sI",
        b"RIFF",
        36 + len(data),
        b"WAVE",
        b"fmt ",
        16,
        1,
        1,
        sample_rate,
        sample_rate * 2,
        2,
        16,
        b"data",
        len(data),
    )
    return header + data


def render_recording(task: SpeakerTask, repetition: int) -> bytes:
    """Return the WAV file of one generated recording.

    Raises
    ------
    AudioInputError
        If the source recording cannot be read or is silent, because the
        noise level is relative to its RMS and silent copies would be
        identical.
    """
    rng = np.random.default_rng([task.seed, task.plan.number, repetition])
    source = task.sources.get(repetition)
    if source is None:
        available = sorted(task.sources)
        source = task.sources[available[int(rng.integers(len(available)))]]
    try:
        recording = read_wav(source)
    except AudioInputError as error:
        raise AudioInputError(
            f"source recording {source}: {error}; replace or remove the file"
        ) from None
    if not np.any(recording.samples):
        raise AudioInputError(
            f"source recording {source} is silent (all samples are zero); "
            "remove it from the source folder"
        )
    variation = draw_variation(rng, recording.sample_rate)
    samples = apply_variation(recording.samples, variation, rng)
    return pcm16_wav_bytes(samples, recording.sample_rate)


def recording_path(output: Path, speaker_id: str, digit: int, repetition: int) -> Path:
    """Return the upstream-layout path of one generated recording."""
    return output / speaker_id / f"{digit}_{speaker_id}_{repetition}.wav"


def generate_speaker(task: SpeakerTask) -> tuple[int, int, int]:
    """Write the recordings of one generated speaker.

    A file that exists with exactly the rendered bytes is kept, any other
    is written atomically. Temporary files that a killed run left in the
    speaker's folder are removed first.

    Returns
    -------
    written : int
        Files written.
    unchanged : int
        Files that already had the rendered bytes.
    size : int
        Bytes of all the speaker's files.
    """
    folder = Path(task.output) / task.plan.speaker_id
    # write_bytes removes the temporaries of the file it writes. This sweep
    # also covers files that are kept, so a finished rerun leaves none.
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    written = unchanged = size = 0
    for repetition in range(task.plan.repetitions):
        content = render_recording(task, repetition)
        target = recording_path(Path(task.output), task.plan.speaker_id, task.digit, repetition)
        size += len(content)
        if _has_content(target, content):
            unchanged += 1
            continue
        write_bytes(target, content)
        written += 1
    return written, unchanged, size


def _has_content(path: Path, content: bytes) -> bool:
    try:
        if path.stat().st_size != len(content):
            return False
        return path.read_bytes() == content
    except FileNotFoundError:
        return False


def marker_content(source: Path, digit: int, count: int, seed: int) -> dict[str, Any]:
    """Return the arguments that determine the output, as stored in `MARKER_FILE`."""
    return {
        "generator": "audiomnist_anomalies.generate",
        "source": str(source.resolve()),
        "digit": digit,
        "count": count,
        "seed": seed,
    }


def check_separate(source: Path, output: Path) -> None:
    """Refuse an output folder inside the source folder, or the other way round.

    The pipeline reads every subfolder of its source, so generated files
    inside the source would be mixed into it as real recordings.
    """
    source, output = source.resolve(), output.resolve()
    if output == source or source in output.parents or output in source.parents:
        raise ParameterError(
            f"output folder {str(output)!r} and source folder {str(source)!r} overlap; "
            "give an output folder outside the source folder"
        )


def prepare_output(output: Path, marker: dict[str, Any]) -> None:
    """Create the output folder, or accept a previous output with the same arguments.

    Raises
    ------
    ParameterError
        If ``output`` is a file, or a folder that is neither empty nor
        written by this command with the same arguments.
    """
    if output.exists() and not output.is_dir():
        raise ParameterError(f"output {str(output)!r} is a file, not a folder")
    if output.is_dir() and any(output.iterdir()):
        marker_path = output / MARKER_FILE
        if not marker_path.is_file():
            raise ParameterError(
                f"output folder {str(output)!r} is not empty and was not written by "
                "this generator; give an empty or new folder"
            )
        try:
            previous = json.loads(marker_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ParameterError(f"cannot read {marker_path}: {error}") from None
        if previous != marker:
            raise ParameterError(
                f"output folder {str(output)!r} was generated with other arguments "
                f"({_describe(previous)}); use an empty folder, or rerun with the "
                "same arguments to complete it"
            )
        log.info(
            "generate: %s contains a previous output with the same arguments; "
            "keeping the files that match",
            output,
        )
        return
    output.mkdir(parents=True, exist_ok=True)
    write_json(output / MARKER_FILE, marker)


def _describe(marker: Any) -> str:
    if not isinstance(marker, dict):
        return "unreadable record"
    keys = ("source", "digit", "count", "seed")
    return ", ".join(f"{key} {marker.get(key)!r}" for key in keys)


def run_tasks(tasks: list[SpeakerTask], workers: int) -> Iterator[tuple[int, int, int]]:
    """Run `generate_speaker` on every task and yield the results as they finish.

    One worker runs the tasks in this process. More workers use a process
    pool, and the first failure cancels the tasks that have not started.
    """
    # More processes than tasks would only start idle ones.
    workers = min(workers, len(tasks))
    if workers <= 1:
        for task in tasks:
            yield generate_speaker(task)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(generate_speaker, task) for task in tasks]
        try:
            for future in as_completed(futures):
                yield future.result()
        finally:
            for future in futures:
                future.cancel()


def generate(
    source: Path, output: Path, count: int, seed: int = 0, digit: int = 6, workers: int = 1
) -> str:
    """Write the generated data set and return a one-line summary.

    Parameters
    ----------
    source : Path
        Folder in the upstream ``data/`` layout.
    output : Path
        Empty or new folder, or a previous output with the same arguments.
    count : int
        Number of recordings to write.
    seed : int
        Seed of every random variation.
    digit : int
        Digit whose source recordings are used and whose names are written.
    workers : int
        Number of processes; -1 uses every usable core.

    Raises
    ------
    PipelineError
        For invalid arguments, a source folder without usable recordings,
        an output folder that is in use, or an unreadable source recording.
    """
    validate_arguments(count, seed, digit, workers)
    if workers == -1:
        workers = default_workers()
    check_separate(source, output)
    recordings = find_source_recordings(source, digit)
    plans = plan_speakers(count, list(recordings))
    metadata = build_metadata(plans, read_source_metadata(source))
    prepare_output(output, marker_content(source, digit, count, seed))
    write_text(output / METADATA_FILE, json.dumps(metadata, indent=4) + "\n")

    log.info(
        "generate: %d recordings of digit %d for %d speakers from %d source speakers "
        "in %s, %d processes",
        count,
        digit,
        len(plans),
        len(recordings),
        source,
        workers,
    )
    started = time.perf_counter()
    tasks = [
        SpeakerTask(
            plan,
            {repetition: str(path) for repetition, path in recordings[plan.source_speaker].items()},
            digit,
            seed,
            str(output),
        )
        for plan in plans
    ]
    written = unchanged = size = 0
    next_report = 1
    for speaker_written, speaker_unchanged, speaker_size in run_tasks(tasks, workers):
        written += speaker_written
        unchanged += speaker_unchanged
        size += speaker_size
        done = written + unchanged
        if done * PROGRESS_STEPS >= next_report * count:
            log.info("generate: %d of %d files (%d%%)", done, count, 100 * done // count)
            next_report = done * PROGRESS_STEPS // count + 1
    return (
        f"{written} files written, {unchanged} already present, {size} bytes "
        f"({size / 1e6:.1f} MB) in {output}, {time.perf_counter() - started:.1f} s"
    )


def validate_arguments(count: int, seed: int, digit: int, workers: int) -> None:
    """Raise `ParameterError` for a count, seed, digit or worker number out of range."""
    if count < 1:
        raise ParameterError(f"--count must be at least 1, got {count}")
    if seed < 0:
        raise ParameterError(f"--seed must be 0 or more, got {seed}")
    if not 0 <= digit <= 9:
        raise ParameterError(f"--digit must be 0 to 9, got {digit}")
    if workers < 1 and workers != -1:
        raise ParameterError(
            f"--workers must be at least 1, or -1 for every usable core, got {workers}"
        )


def default_workers() -> int:
    """Return the number of cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def make_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m audiomnist_anomalies.generate",
        description=(
            "Write a larger data set in the upstream AudioMNIST layout from real "
            "recordings of one digit: 50 repetitions per generated speaker, each a "
            "source recording with a random gain, time shift and low-level noise, "
            "and a copy of the source speaker's metadata entry."
        ),
    )
    parser.add_argument(
        "--source",
        type=Path,
        required=True,
        metavar="DIR",
        help="folder in the upstream data/ layout: {speaker}/{digit}_{speaker}_"
        "{repetition}.wav and audioMNIST_meta.txt",
    )
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="output folder: new, empty, or a previous output with the same arguments",
    )
    parser.add_argument(
        "--count", type=int, required=True, metavar="N", help="number of recordings to write"
    )
    parser.add_argument(
        "--seed", type=int, default=0, metavar="S", help="seed of the variations (default: 0)"
    )
    parser.add_argument(
        "--digit", type=int, default=6, metavar="D", help="digit to use (default: 6)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        metavar="W",
        help="number of processes, -1 for every usable core (default: the number of usable cores)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Returns 0, 2 for a user error, 130 when interrupted by Ctrl-C and 143 when
    stopped by SIGTERM.
    """
    options = make_parser().parse_args(argv)
    configure_logging(bool(os.environ.get("AUDIOMNIST_DEBUG")))
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        summary = generate(
            options.source,
            options.out,
            options.count,
            seed=options.seed,
            digit=options.digit,
            workers=options.workers,
        )
    except PipelineError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as error:
        print(f"error: cannot write the output: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as interrupt:
        print(
            "error: interrupted; the files written so far are complete, rerun the same "
            "command to finish",
            file=sys.stderr,
        )
        return interrupted_status(interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)
    log.info("generate done: %s", summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
