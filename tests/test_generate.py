"""The data set generator: layout, metadata, variations, determinism and errors.

The source is 3 synthetic speakers x 4 repetitions. Repetitions 4 to 49 of
each generated speaker therefore come from a seeded choice of source
repetition, and speaker 02 repetition 1 peaks at 0.99 of full scale, so
its gain is limited.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import signal as scipy_signal

from audiomnist_anomalies.audio import read_wav
from audiomnist_anomalies.errors import AudioInputError, ParameterError
from audiomnist_anomalies.fetch import fetch_local
from audiomnist_anomalies.generate import (
    GAIN_DB_RANGE,
    MARKER_FILE,
    MAX_SHIFT_SECONDS,
    NOISE_DB_BELOW_RMS_RANGE,
    PEAK_LIMIT,
    build_metadata,
    generate,
    plan_speakers,
)
from audiomnist_anomalies.spectra import compute_spectra
from synthetic import SAMPLE_RATE, make_dataset, speech_like, write_wav

SOURCE_SPEAKERS = ("01", "02", "03")
SOURCE_REPETITIONS = 4
COUNT = 120
LOUD_SOURCE = ("02", 1)
LOUD_PEAK = 0.99
MAX_SHIFT = round(MAX_SHIFT_SECONDS * SAMPLE_RATE)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 speakers x 4 repetitions of speech-like audio, one of them near full scale."""
    root = make_dataset(
        tmp_path_factory.mktemp("source") / "data",
        speakers=len(SOURCE_SPEAKERS),
        repetitions=SOURCE_REPETITIONS,
        anomalies=False,
    )
    speaker, repetition = LOUD_SOURCE
    loud = speech_like(np.random.default_rng(99), 0.6)
    loud *= LOUD_PEAK / np.max(np.abs(loud))
    write_wav(root / speaker / f"6_{speaker}_{repetition}.wav", loud)
    return root


@pytest.fixture(scope="module")
def generated(source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 recordings written by one worker."""
    output = tmp_path_factory.mktemp("generated") / "out"
    generate(source, output, COUNT, seed=3, workers=1)
    return output


def wav_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.wav"))


def digests(folder: Path) -> dict[str, str]:
    """Return the SHA-256 of every file below ``folder`` by relative path."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def pcm(path: Path) -> np.ndarray:
    """Return the samples of a 16-bit WAV file as integers."""
    return np.round(read_wav(path).samples * 32768).astype(np.int64)


def peak_correlation(output: np.ndarray, source: np.ndarray) -> tuple[float, int]:
    """Return the maximum normalized cross-correlation and its lag in samples."""
    correlation = scipy_signal.correlate(output, source, mode="full", method="fft")
    lags = scipy_signal.correlation_lags(output.size, source.size, mode="full")
    best = int(np.argmax(correlation))
    scale = np.linalg.norm(output) * np.linalg.norm(source)
    return float(correlation[best] / scale), int(lags[best])


def source_samples(source: Path) -> dict[tuple[str, int], np.ndarray]:
    return {
        (speaker, repetition): pcm(source / speaker / f"6_{speaker}_{repetition}.wav").astype(float)
        for speaker in SOURCE_SPEAKERS
        for repetition in range(SOURCE_REPETITIONS)
    }


def match_sources(generated: Path, source: Path, folder: str = "*") -> list[dict]:
    """For every output in ``folder``, find the source recording it correlates with best."""
    sources = source_samples(source)
    matches = []
    for path in sorted(generated.glob(f"{folder}/*.wav")):
        _, speaker, repetition = path.stem.split("_")
        output = pcm(path).astype(float)
        if speaker in SOURCE_SPEAKERS and int(repetition) < SOURCE_REPETITIONS:
            best = (speaker, int(repetition))
        else:
            # Every fourth sample (12 kHz) keeps the synthetic harmonics, which
            # end at 3 kHz, and shortens the search over all sources.
            coarse = {
                key: peak_correlation(output[::4], samples[::4])[0]
                for key, samples in sources.items()
            }
            best = max(coarse, key=coarse.get)
        correlation, lag = peak_correlation(output, sources[best])
        matches.append(
            {
                "path": path,
                "speaker": speaker,
                "repetition": int(repetition),
                "output": output,
                "source_key": best,
                "source": sources[best],
                "correlation": correlation,
                "lag": lag,
            }
        )
    return matches


@pytest.fixture(scope="module")
def matches(generated: Path, source: Path) -> list[dict]:
    return match_sources(generated, source)


def aligned(match: dict) -> tuple[np.ndarray, np.ndarray]:
    """Return the overlapping parts of an output and its source."""
    shift = match["lag"]
    if shift >= 0:
        return match["output"][shift:], match["source"]
    return match["output"], match["source"][-shift:]


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "audiomnist_anomalies.generate", *arguments],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_layout_for_partial_last_speaker(generated):
    names = [path.relative_to(generated).as_posix() for path in wav_files(generated)]
    expected = sorted(
        f"{speaker}/6_{speaker}_{repetition}.wav"
        for speaker, repetitions in (("01", 50), ("02", 50), ("03", 20))
        for repetition in range(repetitions)
    )

    assert len(names) == COUNT
    assert names == expected
    assert sorted(path.name for path in generated.iterdir()) == [
        MARKER_FILE, "01", "02", "03", "audioMNIST_meta.txt"
    ]


def test_marker_records_arguments(generated, source):
    marker = json.loads((generated / MARKER_FILE).read_text())

    assert marker["count"] == COUNT
    assert marker["seed"] == 3
    assert marker["digit"] == 6
    assert marker["source"] == str(source.resolve())


def test_metadata_copies_source_entries(generated, source):
    written = json.loads((generated / "audioMNIST_meta.txt").read_text())
    original = json.loads((source / "audioMNIST_meta.txt").read_text())

    assert list(written) == ["01", "02", "03"]
    for speaker in SOURCE_SPEAKERS:
        assert written[speaker] == original[speaker]


def test_speakers_cycle_through_sources(source, tmp_path):
    output = tmp_path / "out"
    generate(source, output, 170, seed=3, workers=1)
    written = json.loads((output / "audioMNIST_meta.txt").read_text())
    original = json.loads((source / "audioMNIST_meta.txt").read_text())
    speaker_04 = match_sources(output, source, "04")
    known = {match["repetition"]: match["source_key"] for match in speaker_04}

    assert list(written) == ["01", "02", "03", "04"]
    assert written["04"] == original["01"]
    assert len(speaker_04) == 20
    assert {match["source_key"][0] for match in speaker_04} == {"01"}
    for repetition in range(SOURCE_REPETITIONS):
        assert known[repetition] == ("01", repetition)


def test_plan_for_100000_recordings():
    sources = [f"{number:02d}" for number in range(1, 61)]
    plans = plan_speakers(100_000, sources)

    assert len(plans) == 2000
    assert sum(plan.repetitions for plan in plans) == 100_000
    assert [plan.speaker_id for plan in plans[:2]] == ["01", "02"]
    assert plans[98].speaker_id == "99"
    assert plans[99].speaker_id == "100"
    assert plans[-1].speaker_id == "2000"
    assert plans[-1].repetitions == 50
    assert plans[60].source_speaker == "01"
    assert plans[-1].source_speaker == "20"


@pytest.mark.parametrize(
    "count, repetitions",
    [(1, [1]), (50, [50]), (51, [50, 1]), (120, [50, 50, 20])],
)
def test_plan_repetitions_per_speaker(count, repetitions):
    plans = plan_speakers(count, ["01", "02", "03"])

    assert [plan.repetitions for plan in plans] == repetitions


def test_metadata_without_source_entry_is_left_out():
    plans = plan_speakers(120, ["01", "02", "03"])
    entries = build_metadata(plans, {"01": {"gender": "male"}, "03": {"gender": "female"}})

    assert entries == {"01": {"gender": "male"}, "03": {"gender": "female"}}


def test_outputs_decode_as_pcm16_at_48khz(generated):
    for path in wav_files(generated):
        recording = read_wav(path)

        assert recording.sample_rate == SAMPLE_RATE
        assert recording.channels == 1
        assert recording.encoding == "pcm16"


def test_no_two_outputs_identical(generated, source):
    outputs = {hashlib.sha256(path.read_bytes()).hexdigest() for path in wav_files(generated)}
    inputs = {hashlib.sha256(path.read_bytes()).hexdigest() for path in wav_files(source)}

    assert len(outputs) == COUNT
    assert not outputs & inputs


def test_outputs_correlate_with_their_source(matches):
    for match in matches:
        assert match["correlation"] > 0.99, match["path"]
        assert match["source_key"][0] == match["speaker"], match["path"]


def test_outputs_differ_from_source_samples(matches):
    for match in matches:
        output, source = aligned(match)

        assert not np.array_equal(output, source), match["path"]


def test_shift_is_padding_or_trimming(matches):
    lags = []
    for match in matches:
        length_change = match["output"].size - match["source"].size

        assert match["lag"] == length_change, match["path"]
        assert abs(length_change) <= MAX_SHIFT, match["path"]
        lags.append(length_change)
    assert min(lags) < 0 < max(lags)


def test_gain_within_range(matches):
    gains_db = []
    for match in matches:
        output, source = aligned(match)
        gain = np.dot(output, source) / np.dot(source, source)
        gains_db.append(20 * np.log10(gain))

    assert min(gains_db) >= GAIN_DB_RANGE[0] - 0.05
    assert max(gains_db) <= GAIN_DB_RANGE[1] + 0.05
    assert max(gains_db) - min(gains_db) > 5.0


def test_noise_level_within_range(matches):
    for match in matches:
        output, source = aligned(match)
        gain = np.dot(output, source) / np.dot(source, source)
        residual = output / gain - source
        source_rms = np.sqrt(np.mean(match["source"] ** 2))
        level_db = 20 * np.log10(np.sqrt(np.mean(residual**2)) / source_rms)

        assert -NOISE_DB_BELOW_RMS_RANGE[1] - 1.0 <= level_db, match["path"]
        assert level_db <= -NOISE_DB_BELOW_RMS_RANGE[0] + 1.0, match["path"]


def test_no_sample_clips(generated, matches):
    limit = round(PEAK_LIMIT * 32768)
    loud = [match for match in matches if match["source_key"] == LOUD_SOURCE]

    for path in wav_files(generated):
        assert np.max(np.abs(pcm(path))) <= limit, path
    assert any(np.max(np.abs(match["output"])) >= limit - 1 for match in loud)


def test_workers_give_identical_bytes(generated, source, tmp_path):
    output = tmp_path / "parallel"
    generate(source, output, COUNT, seed=3, workers=2)

    assert digests(output) == digests(generated)


def test_other_seed_changes_every_file(generated, source, tmp_path):
    output = tmp_path / "seed4"
    generate(source, output, COUNT, seed=4, workers=1)
    first = digests(generated)
    second = digests(output)

    for name in first:
        if name.endswith(".wav"):
            assert first[name] != second[name], name


def test_rerun_repairs_missing_and_changed_files(generated, source, tmp_path):
    output = tmp_path / "out"
    generate(source, output, COUNT, seed=3, workers=1)
    (output / "01" / "6_01_3.wav").unlink()
    stale = output / "01" / ".6_01_3.wav.x1y2z3.tmp"
    stale.write_bytes(b"partial")
    stale_beside_complete = output / "03" / ".6_03_5.wav.a1b2c3.tmp"
    stale_beside_complete.write_bytes(b"partial")
    (output / "02" / "6_02_7.wav").write_bytes(b"changed")
    summary = generate(source, output, COUNT, seed=3, workers=2)

    assert summary.startswith(f"2 files written, {COUNT - 2} already present")
    assert not stale.exists()
    assert not stale_beside_complete.exists()
    assert digests(output) == digests(generated)


def test_rerun_with_other_arguments_rejected(generated, source):
    with pytest.raises(ParameterError, match="use an empty folder"):
        generate(source, generated, COUNT, seed=4, workers=1)
    with pytest.raises(ParameterError, match="count 120"):
        generate(source, generated, COUNT + 1, seed=3, workers=1)


def test_unreadable_source_recording_stops_run(source, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(source, copy)
    (copy / "02" / "6_02_2.wav").write_bytes(b"RIFF")

    with pytest.raises(AudioInputError, match=r"6_02_2\.wav: not a WAV file"):
        generate(copy, tmp_path / "out", COUNT, seed=3, workers=2)


def test_spectra_accepts_generated_folder(generated, tmp_path):
    raw = tmp_path / "raw"
    copied = fetch_local(generated, 6, raw)
    result = compute_spectra(raw, 6, 6800, 1.0, 5)
    direct = compute_spectra(generated, 6, 6800, 1.0, 5)

    assert copied == COUNT
    assert result.rejected == []
    assert len(result.recordings) == COUNT
    assert {row["speaker"] for row in result.recordings} == {"01", "02", "03"}
    assert all(row["gender"] for row in result.recordings)
    assert direct.rejected == []
    assert len(direct.recordings) == COUNT


def assert_user_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()

    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


def test_cli_missing_source(tmp_path):
    result = run_cli(
        "--source", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), "--count", "10"
    )

    assert_user_error(result, "not found")
    assert not (tmp_path / "out").exists()


def test_cli_source_file_is_not_a_folder(tmp_path):
    recording = write_wav(tmp_path / "6_01_0.wav", speech_like(np.random.default_rng(1), 0.5))
    result = run_cli("--source", str(recording), "--out", str(tmp_path / "out"), "--count", "10")

    # It said "not found" for a file that exists.
    assert_user_error(result, f"source folder '{recording}' is not a folder")


def test_cli_source_without_digit(tmp_path):
    write_wav(tmp_path / "data" / "01" / "7_01_0.wav", speech_like(np.random.default_rng(1), 0.5))
    result = run_cli(
        "--source", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--count", "10"
    )

    assert_user_error(result, "no recordings of digit 6")


def test_cli_count_zero(source, tmp_path):
    result = run_cli("--source", str(source), "--out", str(tmp_path / "out"), "--count", "0")

    assert_user_error(result, "--count must be at least 1, got 0")
    assert not (tmp_path / "out").exists()


def test_cli_workers_zero_names_minus_one(source, tmp_path):
    result = run_cli(
        "--source", str(source), "--out", str(tmp_path / "out"), "--count", "10", "--workers", "0"
    )

    assert_user_error(result, "--workers must be at least 1, or -1 for every usable core, got 0")


def test_every_core_gives_identical_bytes(generated, source, tmp_path):
    output = tmp_path / "every-core"
    generate(source, output, COUNT, seed=3, workers=-1)

    assert digests(output) == digests(generated)


@pytest.mark.parametrize("inside", ["out_in_source", "source_in_out"])
def test_cli_output_overlapping_source(source, tmp_path, inside):
    output = source / "generated" if inside == "out_in_source" else source.parent
    before = sorted(path.relative_to(source).as_posix() for path in source.rglob("*"))
    result = run_cli("--source", str(source), "--out", str(output), "--count", "10")

    assert_user_error(result, "overlap")
    assert sorted(path.relative_to(source).as_posix() for path in source.rglob("*")) == before


def test_cli_unrelated_output_folder(source, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "notes.txt").write_text("keep me")
    result = run_cli("--source", str(source), "--out", str(output), "--count", "10")

    assert_user_error(result, "not empty")
    assert sorted(path.name for path in output.iterdir()) == ["notes.txt"]


def test_cli_rerun_with_other_count(generated, source):
    result = run_cli(
        "--source", str(source), "--out", str(generated), "--count", "10", "--seed", "3"
    )

    assert_user_error(result, "use an empty folder")


def test_cli_writes_summary(source, tmp_path):
    output = tmp_path / "out"
    result = run_cli(
        "--source", str(source), "--out", str(output), "--count", "7", "--workers", "2"
    )

    assert result.returncode == 0, result.stderr
    assert "7 files written, 0 already present" in result.stderr
    assert len(wav_files(output)) == 7


def test_more_workers_than_speakers_start_no_idle_processes(generated, source, tmp_path):
    # --workers 100000 used to fork 100,000 processes for a few speaker tasks.
    output = tmp_path / "many-workers"
    generate(source, output, COUNT, seed=3, workers=100_000)

    assert digests(output) == digests(generated)


def test_termination_request_exits_with_143_and_rerun_finishes(source, tmp_path):
    output = tmp_path / "out"
    command = [
        sys.executable, "-m", "audiomnist_anomalies.generate",
        "--source", str(source), "--out", str(output), "--count", "3000", "--workers", "1",
    ]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not any(output.glob("*/*.wav")) and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)

    assert process.returncode == 143, stderr
    assert "interrupted; the files written so far are complete" in stderr
    assert "Traceback" not in stderr
    written = len(wav_files(output))
    assert 0 < written < 3000
    assert not list(output.rglob(".*.tmp"))

    assert subprocess.run(command, capture_output=True, timeout=120).returncode == 0
    assert len(wav_files(output)) == 3000
