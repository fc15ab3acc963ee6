"""Synthetic recordings and data sets in the upstream AudioMNIST layout.

The tests write every WAV file they use with these helpers: tones, noise
and speech-like signals (a voiced chirp with formant-like harmonics under
an amplitude envelope), plus the metadata file.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
from scipy.io import wavfile

SAMPLE_RATE = 48_000


def tone(frequency_hz: float, duration_s: float, sample_rate: int = SAMPLE_RATE,
         amplitude: float = 0.5) -> np.ndarray:
    """Return a sine wave."""
    time = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    return amplitude * np.sin(2 * np.pi * frequency_hz * time)


def speech_like(rng: np.random.Generator, duration_s: float,
                sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Return a voiced chirp with harmonics and a smooth envelope, like a spoken word.

    The fundamental glides between 100 and 220 Hz; harmonics up to 3 kHz are
    weighted by two formant-like bumps whose centres vary per call.
    """
    n = int(round(duration_s * sample_rate))
    time = np.arange(n) / sample_rate
    start, end = rng.uniform(100, 220, size=2)
    fundamental = np.linspace(start, end, n)
    phase = 2 * np.pi * np.cumsum(fundamental) / sample_rate
    formants = rng.uniform([400, 1500], [800, 2500])
    signal = np.zeros(n)
    for harmonic in range(1, 16):
        frequency = harmonic * (start + end) / 2
        weight = sum(np.exp(-((frequency - centre) / 250.0) ** 2) for centre in formants)
        signal += (0.2 / harmonic + weight) * np.sin(harmonic * phase)
    envelope = np.sin(np.pi * np.clip(time / duration_s, 0, 1)) ** 2
    signal *= envelope
    signal += 0.002 * rng.standard_normal(n)
    return 0.3 * signal / np.max(np.abs(signal))


def to_int16(signal: np.ndarray) -> np.ndarray:
    """Convert a float signal in [-1, 1] to 16-bit PCM samples."""
    return np.round(np.clip(signal, -1, 1) * 32767).astype("<i2")


def write_wav(path: Path, signal: np.ndarray, sample_rate: int = SAMPLE_RATE,
              dtype: str = "int16") -> Path:
    """Write a float signal as a WAV file of the given sample type."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype == "int16":
        data = to_int16(signal)
    elif dtype == "uint8":
        data = np.round(np.clip(signal, -1, 1) * 127 + 128).astype(np.uint8)
    elif dtype == "int32":
        data = np.round(np.clip(signal, -1, 1) * (2**31 - 1)).astype("<i4")
    elif dtype in ("float32", "float64"):
        data = signal.astype(dtype)
    else:
        raise ValueError(dtype)
    wavfile.write(path, sample_rate, data)
    return path


def pcm24_wav_bytes(signal: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Return a 24-bit PCM mono WAV file as bytes, built field by field."""
    samples = np.round(np.clip(signal, -1, 1) * (2**23 - 1)).astype("<i4")
    payload = b"".join(int(value).to_bytes(3, "little", signed=True) for value in samples)
    header = struct.pack("<4sI4s", b"RIFF", 36 + len(payload), b"WAVE")
    fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, sample_rate, sample_rate * 3, 3, 24)
    return header + fmt + struct.pack("<4sI", b"data", len(payload)) + payload


def metadata(speakers: list[str], skip: tuple[str, ...] = ()) -> dict:
    """Return upstream-style metadata with its quirks: string ages, 1234, room spellings."""
    rooms = ["Kino", "vr-room", "VR-Room", "vr-romm", "library"]
    entries = {}
    for index, speaker in enumerate(speakers):
        if speaker in skip:
            continue
        entries[speaker] = {
            "accent": "German" if index % 2 else "german",
            "age": str(20 + index) if index % 2 else 20 + index,
            "gender": "female" if index % 3 == 0 else "male",
            "native speaker": "no",
            "origin": "Europe, Germany, Berlin",
            "recordingdate": "17-06-22-11-04-28",
            "recordingroom": rooms[index % len(rooms)],
        }
    if speakers and speakers[-1] in entries:
        entries[speakers[-1]]["age"] = "1234"
    return entries


def make_dataset(root: Path, speakers: int = 4, repetitions: int = 15, digit: int = 6,
                 seed: int = 0, anomalies: bool = True) -> Path:
    """Write a small data set in the upstream ``data/`` layout and return ``root``.

    With ``anomalies`` (and at least 2 speakers and 3 repetitions), three
    recordings carry a defect: strong 50 Hz hum (speaker 01, repetition 0),
    white noise (speaker 02, repetition 1) and hard clipping (last speaker,
    repetition 2).
    """
    rng = np.random.default_rng(seed)
    ids = [f"{index + 1:02d}" for index in range(speakers)]
    for speaker in ids:
        for repetition in range(repetitions):
            signal = speech_like(rng, rng.uniform(0.45, 0.9))
            write_wav(root / speaker / f"{digit}_{speaker}_{repetition}.wav", signal)
    if anomalies and speakers >= 2 and repetitions >= 3:
        hum_path = root / ids[0] / f"{digit}_{ids[0]}_0.wav"
        _, data = wavfile.read(hum_path)
        signal = data / 32768.0
        write_wav(hum_path, signal + tone(50, signal.size / SAMPLE_RATE, amplitude=0.6))
        noise_path = root / ids[1] / f"{digit}_{ids[1]}_1.wav"
        _, data = wavfile.read(noise_path)
        write_wav(noise_path, data / 32768.0 + 0.2 * rng.standard_normal(data.size))
        clip_path = root / ids[-1] / f"{digit}_{ids[-1]}_2.wav"
        _, data = wavfile.read(clip_path)
        write_wav(clip_path, np.clip(data / 32768.0 * 20, -0.3, 0.3))
    (root / "audioMNIST_meta.txt").write_text(json.dumps(metadata(ids), indent=1))
    return root


def wav_bytes(signal: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """Return a 16-bit PCM WAV file as bytes."""
    buffer = io.BytesIO()
    wavfile.write(buffer, sample_rate, to_int16(signal))
    return buffer.getvalue()
