"""The audio reader on malformed, unusual and random input.

Every input must give either a finite mono float signal with a positive
sample rate, or the project's `AudioInputError`, quickly.
"""

from __future__ import annotations

import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audiomnist_anomalies.audio import read_wav
from audiomnist_anomalies.errors import AudioInputError
from wavbuild import FORMAT_EXTENSIBLE, FORMAT_FLOAT, FORMAT_PCM, chunk, riff, wav_file

TIME_LIMIT_S = 2.0


def check_outcome(path) -> str:
    """Read ``path`` and assert the reader's contract; return 'ok' or 'rejected'."""
    started = time.monotonic()
    try:
        recording = read_wav(path)
    except AudioInputError:
        outcome = "rejected"
    else:
        assert recording.samples.ndim == 1
        assert recording.samples.dtype == np.float64
        assert recording.samples.size > 0
        assert np.all(np.isfinite(recording.samples))
        assert recording.sample_rate > 0
        outcome = "ok"
    assert time.monotonic() - started < TIME_LIMIT_S
    return outcome


def pcm16(values) -> bytes:
    return np.asarray(values, dtype="<i2").tobytes()


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("extensible PCM", wav_file(pcm16([0, 1000, -1000] * 50), FORMAT_EXTENSIBLE), "ok"),
        ("LIST before data", wav_file(pcm16([5] * 99), before=[chunk(b"LIST", b"INFOISFT\x03\x00\x00\x00ab\x00")]), "ok"),
        ("bext after data", wav_file(pcm16([5] * 99), after=[chunk(b"bext", b"\x00" * 602)]), "ok"),
        ("odd-sized chunk first", wav_file(pcm16([5] * 10), before=[chunk(b"junk", b"abc")]), "ok"),
        ("header only", riff([chunk(b"fmt ", struct.pack("<HHIIHH", 1, 1, 48000, 96000, 2, 16))]), "rejected"),
        ("zero channels", wav_file(pcm16([1, 2]), channels=0), "rejected"),
        ("zero sample rate", wav_file(pcm16([1, 2]), sample_rate=0), "rejected"),
        ("data size too large", wav_file(pcm16([7] * 100), data_size=10_000_000), "rejected"),
        ("unknown data size", wav_file(pcm16([7] * 100), data_size=2**32 - 1), "ok"),
        ("RIFF size too large", riff([chunk(b"data", pcm16([1] * 4))], riff_size=2**32 - 1), "rejected"),
        ("12 bits per sample", wav_file(b"\x01\x02" * 20, bits=12), "rejected"),
        ("RIFX big-endian magic only", b"RIFX" + b"\x00" * 40, "rejected"),
        ("float infinity", wav_file(np.array([0.1, np.inf], "<f4").tobytes(), FORMAT_FLOAT, bits=32), "rejected"),
        ("float64", wav_file(np.array([0.1, -0.2] * 20, "<f8").tobytes(), FORMAT_FLOAT, bits=64), "ok"),
    ],
)
def test_unusual_files(tmp_path, name, content, expected):
    path = tmp_path / "case.wav"
    path.write_bytes(content)

    assert check_outcome(path) == expected, name


def test_zero_size_chunks_do_not_loop(tmp_path):
    # A reader that advances by the declared chunk size never moves past a
    # chunk that declares a negative or wrapped size.
    content = riff([chunk(b"fmt ", b"", size=0)] * 2000 + [chunk(b"data", pcm16([1] * 4), size=2**32 - 8)])
    path = tmp_path / "loop.wav"
    path.write_bytes(content)

    assert check_outcome(path) in ("ok", "rejected")


def test_truncated_download_is_rejected(tmp_path):
    full = wav_file(pcm16(np.arange(1000)))
    path = tmp_path / "truncated.wav"
    path.write_bytes(full[: len(full) // 2 + 1])

    with pytest.raises(AudioInputError, match="truncated WAV file: the header declares 2000 bytes"):
        read_wav(path)


def test_extensible_float64_decodes(tmp_path):
    values = np.array([0.25, -0.5, 0.125] * 10)
    path = tmp_path / "extensible.wav"
    path.write_bytes(wav_file(values.astype("<f8").tobytes(), FORMAT_EXTENSIBLE, bits=64))
    recording = read_wav(path)

    assert recording.encoding == "float64"
    assert np.array_equal(recording.samples, values)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=4096))
def test_random_bytes(tmp_path, content):
    path = tmp_path / "random.wav"
    path.write_bytes(content)

    check_outcome(path)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    format_tag=st.sampled_from([FORMAT_PCM, FORMAT_FLOAT, FORMAT_EXTENSIBLE, 2, 0]),
    channels=st.integers(0, 8),
    sample_rate=st.integers(0, 400_000),
    bits=st.sampled_from([0, 8, 12, 16, 24, 32, 64]),
    payload=st.binary(max_size=2048),
    data_size=st.one_of(st.none(), st.integers(0, 2**32 - 1)),
    extra=st.lists(st.tuples(st.sampled_from([b"LIST", b"bext", b"JUNK", b"fact"]), st.binary(max_size=64)), max_size=3),
)
def test_random_headers(tmp_path, format_tag, channels, sample_rate, bits, payload, data_size, extra):
    content = wav_file(
        payload,
        format_tag,
        channels,
        sample_rate,
        bits,
        before=[chunk(identifier, body) for identifier, body in extra],
        data_size=data_size,
    )
    path = tmp_path / "header.wav"
    path.write_bytes(content)

    check_outcome(path)


def test_chunk_past_the_end_is_named(tmp_path):
    # A LIST chunk that declares more bytes than the file has hides the data
    # chunk after it; the reason used to be "no data chunk".
    content = wav_file(pcm16([5] * 99), before=[chunk(b"LIST", b"INFO", size=1_000_000)])
    path = tmp_path / "overrun.wav"
    path.write_bytes(content)

    with pytest.raises(AudioInputError, match="the 'LIST' chunk declares 1000000 bytes, past the end"):
        read_wav(path)
