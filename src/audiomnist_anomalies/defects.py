"""Synthetic defects for measuring how well the detectors find known anomalies.

Each function takes a mono float signal at ``sample_rate`` Hz and returns
the corrupted signal at the same rate; random choices come from ``rng``.
Severities are in the units their names give. After corruption, signals are
quantized to 16-bit PCM as a recorder would store them, so near-silence
really loses resolution.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import signal as scipy_signal

from .audio import resample


def _power(samples: np.ndarray) -> float:
    return float(np.mean(samples**2)) if samples.size else 0.0


def add_noise(samples, sample_rate, rng, snr_db: float) -> np.ndarray:
    """Add white Gaussian noise at ``snr_db`` dB below the signal power."""
    sigma = np.sqrt(_power(samples) / 10 ** (snr_db / 10))
    return samples + rng.normal(0.0, sigma, samples.shape)


def add_hum(samples, sample_rate, rng, frequency_hz: float, snr_db: float) -> np.ndarray:
    """Add mains hum: the fundamental and two harmonics at amplitudes 1, 1/2, 1/4."""
    time = np.arange(samples.shape[0]) / sample_rate
    hum = sum(
        amplitude * np.sin(2 * np.pi * harmonic * frequency_hz * time + rng.uniform(0, 2 * np.pi))
        for harmonic, amplitude in ((1, 1.0), (2, 0.5), (3, 0.25))
    )
    hum *= np.sqrt(_power(samples) / 10 ** (snr_db / 10) / _power(hum))
    return samples + hum


def clip(samples, sample_rate, rng, level: float) -> np.ndarray:
    """Clip at ``level`` times the peak, then restore the original peak."""
    peak = float(np.max(np.abs(samples)))
    if peak == 0:
        return samples.copy()
    return np.clip(samples, -level * peak, level * peak) / level


def low_pass(samples, sample_rate, rng, cutoff_hz: float) -> np.ndarray:
    """Muffle with a 6th-order Butterworth low-pass filter, zero phase."""
    sos = scipy_signal.butter(6, cutoff_hz, "lowpass", fs=sample_rate, output="sos")
    return scipy_signal.sosfiltfilt(sos, samples)


def high_pass(samples, sample_rate, rng, cutoff_hz: float) -> np.ndarray:
    """Thin out with a 6th-order Butterworth high-pass filter, zero phase."""
    sos = scipy_signal.butter(6, cutoff_hz, "highpass", fs=sample_rate, output="sos")
    return scipy_signal.sosfiltfilt(sos, samples)


def cut_off(samples, sample_rate, rng, keep: float) -> np.ndarray:
    """Keep only the first ``keep`` fraction of the recording."""
    return samples[: max(1, int(round(keep * samples.shape[0])))].copy()


def reverse(samples, sample_rate, rng) -> np.ndarray:
    """Play the recording backwards: same magnitude spectrum, different sound."""
    return samples[::-1].copy()


def change_speed(samples, sample_rate, rng, factor: float) -> np.ndarray:
    """Play ``factor`` times faster (higher pitch), as with a wrong sample rate."""
    return resample(samples, int(round(sample_rate * factor)), sample_rate)


def near_silence(samples, sample_rate, rng, gain_db: float) -> np.ndarray:
    """Attenuate by ``gain_db`` dB (negative), leaving little above the 16-bit floor."""
    return samples * 10 ** (gain_db / 20)


def dc_offset(samples, sample_rate, rng, offset: float) -> np.ndarray:
    """Add a constant of ``offset`` times the peak."""
    return samples + offset * float(np.max(np.abs(samples)))


def second_voice(samples, sample_rate, rng, level_db: float, other: np.ndarray) -> np.ndarray:
    """Mix in ``other`` (another speaker at the same rate) ``level_db`` dB relative in power.

    The other voice starts up to a fifth of the recording later.
    """
    shift = int(rng.integers(0, max(1, samples.shape[0] // 5)))
    mixed = np.zeros_like(samples)
    part = other[: max(0, samples.shape[0] - shift)]
    mixed[shift : shift + part.shape[0]] = part
    scale = np.sqrt(_power(samples) * 10 ** (level_db / 10) / max(_power(mixed), 1e-20))
    return samples + scale * mixed


def quantize_16_bit(samples: np.ndarray) -> np.ndarray:
    """Clip to full scale and round to 16-bit PCM steps, as a WAV file stores it."""
    return np.round(np.clip(samples, -1.0, 32767 / 32768) * 32768.0) / 32768.0


DEFECTS: dict[str, Callable[..., np.ndarray]] = {
    "noise": add_noise,
    "hum": add_hum,
    "clipping": clip,
    "low_pass": low_pass,
    "high_pass": high_pass,
    "cut_off": cut_off,
    "reversed": reverse,
    "speed": change_speed,
    "near_silence": near_silence,
    "dc_offset": dc_offset,
    "second_voice": second_voice,
}
