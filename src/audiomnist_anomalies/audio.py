"""Audio input and the signal processing shared by the stages.

AudioMNIST recordings are RIFF WAV files, 16-bit signed PCM, mono, 48 kHz,
0.39-1.0 s long. `read_wav` also accepts the other common WAV encodings
(8-bit unsigned, 24- and 32-bit integer, 32- and 64-bit float, extensible
headers, several channels) and converts them to one float channel.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import signal as scipy_signal
from scipy.io import wavfile

from .errors import AudioInputError


@dataclass(frozen=True)
class Recording:
    """A decoded recording.

    Attributes
    ----------
    samples : np.ndarray [shape=(n,), dtype=float64]
        Mono signal scaled to [-1, 1] for integer encodings.
    sample_rate : int
        Sample rate of ``samples`` in Hz.
    channels : int
        Number of channels in the file before the downmix to mono.
    encoding : str
        Sample type in the file, for example ``int16`` or ``float32``.
    """

    samples: np.ndarray
    sample_rate: int
    channels: int
    encoding: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.shape[0] / self.sample_rate


def _to_float(data: np.ndarray) -> np.ndarray:
    kind = data.dtype
    if kind == np.uint8:
        return (data.astype(np.float64) - 128.0) / 128.0
    if kind == np.int16:
        return data.astype(np.float64) / 32768.0
    if kind == np.int32:
        # scipy returns 24-bit PCM left-aligned in int32, so one scale fits both.
        return data.astype(np.float64) / 2147483648.0
    if kind == np.int64:
        return data.astype(np.float64) / 9223372036854775808.0
    if kind in (np.float32, np.float64):
        return data.astype(np.float64)
    raise AudioInputError(f"unsupported sample type {kind}")


def read_wav(path: Path | str) -> Recording:
    """Read a WAV file into a mono float signal.

    Parameters
    ----------
    path : Path or str
        File to read.

    Returns
    -------
    Recording
        Samples averaged over channels, with the file's sample rate in Hz.

    Raises
    ------
    AudioInputError
        If the file is not a readable WAV file, has no samples, has a
        sample rate of zero, or contains NaN or infinite samples.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", wavfile.WavFileWarning)
            sample_rate, data = wavfile.read(path, mmap=False)
    except FileNotFoundError:
        raise AudioInputError(f"file not found: {path}") from None
    except (ValueError, EOFError, OSError, MemoryError, IndexError) as error:
        message = str(error).strip() or type(error).__name__
        raise AudioInputError(f"not a readable WAV file ({message})") from None
    if sample_rate <= 0:
        raise AudioInputError(f"invalid sample rate {sample_rate} Hz in the header")
    if data.size == 0:
        raise AudioInputError("WAV file has no samples")
    encoding = str(data.dtype)
    samples = _to_float(data)
    channels = 1
    if samples.ndim == 2:
        channels = samples.shape[1]
        samples = samples.mean(axis=1)
    if not np.all(np.isfinite(samples)):
        raise AudioInputError("WAV file contains NaN or infinite samples")
    return Recording(samples, int(sample_rate), channels, encoding)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a signal with a polyphase filter.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        Signal at ``source_rate`` Hz.
    source_rate, target_rate : int
        Sample rates in Hz.

    Returns
    -------
    np.ndarray [shape=(ceil(n * target_rate / source_rate),)]
    """
    if source_rate == target_rate:
        return samples.astype(np.float64, copy=True)
    divisor = math.gcd(source_rate, target_rate)
    return scipy_signal.resample_poly(
        samples, target_rate // divisor, source_rate // divisor
    )


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Trim a signal to ``length`` samples or pad its end with zeros."""
    if samples.shape[0] >= length:
        return samples[:length].copy()
    return np.pad(samples, (0, length - samples.shape[0]))


def moving_average(samples: np.ndarray, window: int) -> np.ndarray:
    """Smooth a signal with a centred moving average of ``window`` samples.

    The output has the input's length; ``window`` 1 returns a copy.
    """
    if window <= 1:
        return samples.copy()
    kernel = np.full(window, 1.0 / window)
    return np.convolve(samples, kernel, mode="same")


def window_length(sample_rate: int, duration: float) -> int:
    """Return the analysis window in samples for a duration in seconds."""
    return int(round(sample_rate * duration))


def preprocess(
    recording: Recording, sample_rate: int, duration: float, smoothing_window: int
) -> np.ndarray:
    """Resample, pad or trim, and smooth a recording for the spectrum.

    Returns
    -------
    np.ndarray [shape=(round(sample_rate * duration),), dtype=float64]
        The signal whose FFT is the recording's spectrum.
    """
    samples = resample(recording.samples, recording.sample_rate, sample_rate)
    samples = fit_length(samples, window_length(sample_rate, duration))
    return moving_average(samples, smoothing_window)


def magnitude_spectrum(samples: np.ndarray) -> tuple[np.ndarray, float]:
    """Compute the FFT magnitude divided by its maximum.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        Preprocessed signal.

    Returns
    -------
    spectrum : np.ndarray [shape=(n // 2 + 1,), dtype=float64]
        Magnitude of the real FFT, with maximum 1.
    maximum : float
        The magnitude that the spectrum was divided by.

    Raises
    ------
    AudioInputError
        If the signal is silent (all magnitudes zero), because the
        normalization is then undefined.
    """
    magnitude = np.abs(np.fft.rfft(samples))
    maximum = float(magnitude.max())
    if not maximum > 0.0:
        raise AudioInputError("silent recording (all samples are zero)")
    return magnitude / maximum, maximum


def frequency_axis(sample_rate: int, duration: float) -> np.ndarray:
    """Return the frequency in Hz of every spectrum column."""
    return np.fft.rfftfreq(window_length(sample_rate, duration), d=1.0 / sample_rate)


def reconstruct_signal(
    samples: np.ndarray, reconstructed_spectrum: np.ndarray, maximum: float
) -> np.ndarray:
    """Build a waveform from a reconstructed spectrum and the original phase.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        The preprocessed original signal, which supplies the phase.
    reconstructed_spectrum : np.ndarray [shape=(n // 2 + 1,)]
        Normalized magnitude, for example a PCA reconstruction. Negative
        values are clipped to zero because a magnitude cannot be negative.
    maximum : float
        The normalization factor of the original spectrum.

    Returns
    -------
    np.ndarray [shape=(n,)]
        Inverse FFT of the rescaled magnitude with the original phase.
    """
    phase = np.angle(np.fft.rfft(samples))
    magnitude = np.clip(reconstructed_spectrum, 0.0, None) * maximum
    return np.fft.irfft(magnitude * np.exp(1j * phase), n=samples.shape[0])
