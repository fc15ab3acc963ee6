"""Audio input and the signal processing shared by the stages.

AudioMNIST recordings are RIFF WAV files, 16-bit signed PCM, mono, 48 kHz,
0.39-1.0 s long. `read_wav` also accepts the other common WAV encodings
(8-bit unsigned, 24- and 32-bit integer, 32- and 64-bit float, extensible
headers, several channels, extra chunks) and converts them to one float
channel. Its own RIFF parser bounds every step by the file size, so no
malformed header can make it loop or allocate more than the file holds.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

from .errors import AudioInputError

# Lowest sample rate a recording may have: speech needs at least the band up
# to 2 kHz, and the defects of the evaluate stage filter up to 2 kHz.
MIN_SAMPLE_RATE = 4000
# Highest sample rate a recording may have. 768 kHz is the highest rate of
# common audio interfaces, so a larger value most likely comes from a
# damaged header.
MAX_SAMPLE_RATE = 768_000

# Seconds of a long recording resampled beyond the analysis window: the
# resampling filter needs the signal past the window's end.
RESAMPLE_MARGIN_S = 0.25
# Seconds of silence appended to a recording shorter than the window before
# it is resampled, longer than the resampling filter's decay.
RESAMPLE_TAIL_S = 0.05

FORMAT_PCM = 0x0001
FORMAT_IEEE_FLOAT = 0x0003
FORMAT_EXTENSIBLE = 0xFFFE
# Writers that stream audio set the data size to this value when the length is unknown.
UNKNOWN_SIZE = 0xFFFFFFFF
# Sample types by (format, bits per sample); 24-bit PCM is decoded separately.
SAMPLE_TYPES = {
    (FORMAT_PCM, 8): np.dtype("u1"),
    (FORMAT_PCM, 16): np.dtype("<i2"),
    (FORMAT_PCM, 24): np.dtype("u1"),
    (FORMAT_PCM, 32): np.dtype("<i4"),
    (FORMAT_IEEE_FLOAT, 32): np.dtype("<f4"),
    (FORMAT_IEEE_FLOAT, 64): np.dtype("<f8"),
}
FULL_SCALE = {8: 128.0, 16: 32768.0, 24: 8388608.0, 32: 2147483648.0}


@dataclass(frozen=True)
class Recording:
    """A decoded recording.

    Attributes
    ----------
    samples : np.ndarray [shape=(n,), dtype=float64]
        Mono signal scaled to [-1, 1) for integer encodings.
    sample_rate : int
        Sample rate of ``samples`` in Hz.
    channels : int
        Number of channels in the file before the downmix to mono.
    encoding : str
        Sample type in the file, for example ``pcm16`` or ``float32``.
    """

    samples: np.ndarray
    sample_rate: int
    channels: int
    encoding: str

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.samples.shape[0] / self.sample_rate


def _chunks(content: bytes) -> dict[bytes, tuple[int, int]]:
    """Return the offset and declared size of the first chunk of each kind.

    Every step advances by at least 8 bytes, so a malformed size can never
    make the walk loop.
    """
    chunks: dict[bytes, tuple[int, int]] = {}
    offset = 12
    while offset + 8 <= len(content):
        identifier = content[offset : offset + 4]
        size = int.from_bytes(content[offset + 4 : offset + 8], "little")
        chunks.setdefault(identifier, (offset + 8, size))
        offset += 8 + size + (size & 1)
    return chunks


def parse_wav(content: bytes) -> tuple[int, np.ndarray, str]:
    """Decode the bytes of a RIFF/WAVE file.

    Parameters
    ----------
    content : bytes
        The whole file.

    Returns
    -------
    sample_rate : int
        In Hz.
    frames : np.ndarray [shape=(n_frames, n_channels), dtype=float64]
        Scaled to [-1, 1) for integer encodings; floats as stored.
    encoding : str
        For example ``pcm16`` or ``float32``.

    Raises
    ------
    AudioInputError
        If the file is not RIFF/WAVE, lacks a ``fmt `` or ``data`` chunk,
        uses an unsupported encoding, declares more samples than it contains
        (a truncated file), or has no samples.
    """
    if len(content) < 12 or content[:4] != b"RIFF" or content[8:12] != b"WAVE":
        if content[:4] in (b"RIFX", b"RF64"):
            raise AudioInputError(
                f"unsupported WAV variant {content[:4].decode()}; convert it to a "
                "little-endian RIFF WAV file"
            )
        raise AudioInputError("not a WAV file (no RIFF/WAVE header)")
    chunks = _chunks(content)
    if b"fmt " not in chunks:
        raise AudioInputError("invalid WAV file: no fmt chunk")
    fmt_offset, fmt_size = chunks[b"fmt "]
    fmt = content[fmt_offset : fmt_offset + min(fmt_size, 40)]
    if len(fmt) < 16:
        raise AudioInputError("invalid WAV file: fmt chunk shorter than 16 bytes")
    format_tag, channels, sample_rate, _, block_align, bits = struct.unpack(
        "<HHIIHH", fmt[:16]
    )
    if format_tag == FORMAT_EXTENSIBLE:
        if len(fmt) < 26:
            raise AudioInputError("invalid WAV file: extensible fmt chunk too short")
        format_tag = struct.unpack("<H", fmt[24:26])[0]
    dtype = SAMPLE_TYPES.get((format_tag, bits))
    if dtype is None:
        raise AudioInputError(
            f"unsupported encoding (format tag {format_tag:#06x}, {bits} bits per "
            "sample); supported are PCM with 8, 16, 24 or 32 bits and IEEE float "
            "with 32 or 64 bits"
        )
    if channels < 1:
        raise AudioInputError("invalid WAV file: 0 channels")
    if sample_rate > MAX_SAMPLE_RATE:
        raise AudioInputError(
            f"sample rate {sample_rate} Hz is above {MAX_SAMPLE_RATE} Hz, far beyond "
            "audio rates; the header is most likely damaged"
        )
    if sample_rate < MIN_SAMPLE_RATE:
        raise AudioInputError(
            f"sample rate {sample_rate} Hz is below {MIN_SAMPLE_RATE} Hz, too low for "
            "speech; record or export the file at a speech sample rate such as 16000 Hz"
        )
    frame_bytes = channels * bits // 8
    if block_align != frame_bytes:
        raise AudioInputError(
            f"invalid WAV file: block align {block_align} bytes, expected {frame_bytes} "
            f"for {channels} channels of {bits} bits"
        )
    if b"data" not in chunks:
        overrun = [
            (identifier, size)
            for identifier, (offset, size) in chunks.items()
            if offset + size > len(content)
        ]
        if overrun:
            # The walk jumped past the end, so a data chunk after it was not seen.
            identifier, size = overrun[0]
            raise AudioInputError(
                f"invalid WAV file: the {identifier.decode('latin-1').strip()!r} chunk "
                f"declares {size} bytes, past the end of the file ({len(content)} bytes); "
                "the header is damaged"
            )
        raise AudioInputError("WAV file has no samples (no data chunk)")

    data_offset, data_size = chunks[b"data"]
    available = len(content) - data_offset
    if data_size == UNKNOWN_SIZE:
        data_size = available - available % frame_bytes
    if data_size > available:
        raise AudioInputError(
            f"truncated WAV file: the header declares {data_size} bytes of samples, "
            f"the file contains {available}"
        )
    n_frames = data_size // frame_bytes
    if n_frames == 0:
        raise AudioInputError("WAV file has no samples")
    raw = content[data_offset : data_offset + n_frames * frame_bytes]

    if bits == 24:
        triples = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
        values = np.where(values >= 1 << 23, values - (1 << 24), values)
    else:
        values = np.frombuffer(raw, dtype=dtype)
    if format_tag == FORMAT_IEEE_FLOAT:
        frames = values.astype(np.float64)
        encoding = f"float{bits}"
    elif bits == 8:
        frames = (values.astype(np.float64) - 128.0) / FULL_SCALE[8]
        encoding = "pcm8"
    else:
        # The full scales are powers of two, so multiplying by the inverse is
        # exact, and converting while multiplying saves a copy.
        frames = np.multiply(values, 1.0 / FULL_SCALE[bits], dtype=np.float64)
        encoding = f"pcm{bits}"
    return int(sample_rate), frames.reshape(n_frames, channels), encoding


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
        If the file cannot be read or parsed (see `parse_wav`), or contains
        NaN or infinite samples.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        raise AudioInputError(f"file not found: {path}") from None
    except OSError as error:
        raise AudioInputError(f"cannot read file: {error.strerror or error}") from None
    return decode_wav(content)


def decode_wav(content: bytes) -> Recording:
    """Decode the bytes of a WAV file into a mono float signal (see `read_wav`)."""
    sample_rate, frames, encoding = parse_wav(content)
    channels = frames.shape[1]
    # Only float encodings can hold NaN or infinite values.
    if encoding.startswith("float") and not np.all(np.isfinite(frames)):
        raise AudioInputError("WAV file contains NaN or infinite samples")
    samples = frames[:, 0] if channels == 1 else frames.mean(axis=1)
    if channels > 1 and not np.any(samples) and np.any(frames):
        raise AudioInputError(
            "channels cancel out when averaged to mono (a channel has inverted "
            "polarity); fix the channel or keep one channel"
        )
    return Recording(np.ascontiguousarray(samples), sample_rate, channels, encoding)


def resample(samples: np.ndarray, source_rate: int, target_rate: int) -> np.ndarray:
    """Resample a signal with the SoX resampler at high quality.

    The pass band is flat within 0.01 dB up to 90% of the lower Nyquist
    frequency, and a tone 5% above that Nyquist frequency is suppressed by
    more than 100 dB instead of aliasing into the spectrum.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        Signal at ``source_rate`` Hz.
    source_rate, target_rate : int
        Sample rates in Hz.

    Returns
    -------
    np.ndarray [shape=(about n * target_rate / source_rate,), dtype=float64]
    """
    if source_rate == target_rate:
        return np.array(samples, dtype=np.float64)
    # At HQ quality soxr filters in single precision. So float64 input gives the
    # same output as its float32 rounding (a test checks this), and float32
    # input saves soxr a conversion.
    single = np.ascontiguousarray(samples, dtype=np.float32)
    return soxr.resample(single, source_rate, target_rate, quality="HQ").astype(np.float64)


def fit_length(samples: np.ndarray, length: int) -> np.ndarray:
    """Trim a signal to ``length`` samples or pad its end with zeros."""
    if samples.shape[0] >= length:
        return samples[:length].copy()
    padded = np.zeros(length, dtype=samples.dtype)
    padded[: samples.shape[0]] = samples
    return padded


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
    # Only the start of a long recording is kept, so only that part and a
    # margin are resampled. The kept samples differ from those of the whole
    # file resampled by less than 1e-9 of its peak.
    needed = math.ceil((duration + RESAMPLE_MARGIN_S) * recording.sample_rate)
    samples = recording.samples[:needed]
    # A recording that ends inside the window is followed by silence. Some of
    # that silence goes through the filter too, which keeps the filter's decay
    # after the last sample. So even a recording shorter than one output
    # sample resamples to something.
    tail = min(needed - samples.shape[0], math.ceil(RESAMPLE_TAIL_S * recording.sample_rate))
    if tail > 0:
        samples = fit_length(samples, samples.shape[0] + tail)
    samples = resample(samples, recording.sample_rate, sample_rate)
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
