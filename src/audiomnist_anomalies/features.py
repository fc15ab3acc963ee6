"""Feature kinds computed from a preprocessed signal.

``spectra.kind`` selects one:

- ``fft_magnitude``: magnitude of the real FFT of the whole window divided by
  its maximum, one column per FFT frequency. This is the original analysis.
- ``log_bands``: power of the whole window pooled into ``spectra.n_bands``
  log-spaced bands between ``spectra.min_frequency_hz`` and
  ``spectra.max_frequency_hz`` (mean power of the FFT bins in each band), in
  dB relative to the sum of the band powers and floored at ``spectra.floor_db``.
- ``log_tf``: the same bands for each of ``spectra.n_frames`` Hann-windowed
  frames (half-overlapping, frame length twice the hop), in dB relative to the
  sum over all bands and frames, so that the features see time order.

Dividing by the summed power instead of the maximum keeps one strong peak
(hum, DC offset) from shrinking the rest of the representation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .audio import Recording, magnitude_spectrum, preprocess
from .errors import AudioInputError
from .outputs import load_npy

KINDS = ("fft_magnitude", "log_bands", "log_tf")


@dataclass(frozen=True)
class Layout:
    """Mapping of feature columns to frequencies and time frames.

    Attributes
    ----------
    kind : str
        One of ``KINDS``.
    frequencies : np.ndarray [shape=(n_frequencies,)]
        Frequency in Hz of each column (FFT bin or band centre).
    n_frames : int
        Time frames; columns are frame-major, ``n_frames * n_frequencies`` in all.
    """

    kind: str
    frequencies: np.ndarray
    n_frames: int

    @property
    def n_features(self) -> int:
        """Number of feature columns."""
        return self.n_frames * self.frequencies.shape[0]

    def per_frequency(self, values: np.ndarray) -> np.ndarray:
        """Average feature-wise values over frames: (n, n_features) -> (n, n_frequencies)."""
        if self.n_frames == 1:
            return values
        return values.reshape(values.shape[0], self.n_frames, -1).mean(axis=1)

    def to_json(self) -> dict[str, Any]:
        """Describe the layout for ``data/features.json``."""
        return {
            "kind": self.kind,
            "n_frames": self.n_frames,
            "n_frequencies": int(self.frequencies.shape[0]),
        }


def load_layout(
    path: Path = Path("data/features.json"), frequencies_path: Path = Path("data/frequencies.npy")
) -> Layout:
    """Read the feature layout that the spectra stage wrote."""
    description = json.loads(path.read_text(encoding="utf-8"))
    return Layout(description["kind"], load_npy(frequencies_path), description["n_frames"])


def band_edges(settings: dict[str, Any]) -> np.ndarray:
    """Return the ``n_bands + 1`` log-spaced band edges in Hz."""
    return np.geomspace(
        settings["min_frequency_hz"], settings["max_frequency_hz"], settings["n_bands"] + 1
    )


def layout(settings: dict[str, Any], length: int) -> Layout:
    """Return the column layout of the features of a window of ``length`` samples."""
    kind = settings["kind"]
    if kind == "fft_magnitude":
        frequencies = np.fft.rfftfreq(length, d=1.0 / settings["sample_rate"])
        return Layout(kind, frequencies, 1)
    edges = band_edges(settings)
    centres = np.sqrt(edges[:-1] * edges[1:])
    return Layout(kind, centres, settings["n_frames"] if kind == "log_tf" else 1)


def _pooling_matrix(bin_frequencies: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Return the (n_bins, n_bands) matrix that averages FFT bin powers into bands.

    A band narrower than the bin spacing takes the bin nearest to its centre.
    """
    key = (bin_frequencies.tobytes(), edges.tobytes())
    matrix = _POOLING_CACHE.get(key)
    if matrix is not None:
        return matrix
    centres = np.sqrt(edges[:-1] * edges[1:])
    band = np.searchsorted(edges, bin_frequencies, side="right") - 1
    matrix = np.zeros((bin_frequencies.shape[0], centres.shape[0]))
    for index, centre in enumerate(centres):
        inside = np.flatnonzero(band == index)
        if inside.size:
            matrix[inside, index] = 1.0 / inside.size
        else:
            matrix[int(np.argmin(np.abs(bin_frequencies - centre))), index] = 1.0
    if len(_POOLING_CACHE) >= 8:
        _POOLING_CACHE.clear()
    _POOLING_CACHE[key] = matrix
    return matrix


# Pooling matrices by (bin frequencies, band edges): every recording of a run
# has the same ones, so each is built once per process.
_POOLING_CACHE: dict[tuple[bytes, bytes], np.ndarray] = {}


def _pool_bands(power: np.ndarray, bin_frequencies: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Average power over the FFT bins in each band (last axis).

    A band narrower than the bin spacing takes the bin nearest to its centre.
    """
    return power @ _pooling_matrix(bin_frequencies, edges)


def _decibels_of_total(power: np.ndarray, floor_db: float) -> tuple[np.ndarray, float]:
    total = float(power.sum())
    if not total > 0:
        raise AudioInputError("silent recording (all samples are zero)")
    return 10 * np.log10(power / total + 10 ** (floor_db / 10)), total


def frames(samples: np.ndarray, n_frames: int) -> np.ndarray:
    """Cut a signal into ``n_frames`` Hann-windowed frames of twice the hop length.

    Frame k is centred on sample ``(k + 0.5) * hop``; the signal is padded with
    zeros where a frame reaches past either end.
    """
    hop = samples.shape[0] // n_frames
    length = 2 * hop
    padded = np.pad(samples, (hop // 2, length))
    starts = np.arange(n_frames) * hop
    windows = np.lib.stride_tricks.sliding_window_view(padded, length)[starts]
    return windows * np.hanning(length)


def compute_features(samples: np.ndarray, settings: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Compute the features of one preprocessed signal.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        Output of `audio.preprocess`.
    settings : dict
        The validated ``spectra`` section of ``params.yaml``.

    Returns
    -------
    features : np.ndarray [shape=(n_features,), dtype=float64]
    scale : float
        The normalization factor: the maximum FFT magnitude for
        ``fft_magnitude``, the summed band power for the log kinds.

    Raises
    ------
    AudioInputError
        If the signal is silent.
    """
    kind = settings["kind"]
    if kind == "fft_magnitude":
        return magnitude_spectrum(samples)
    sample_rate = settings["sample_rate"]
    edges = band_edges(settings)
    if kind == "log_bands":
        power = np.abs(np.fft.rfft(samples)) ** 2
        bins = np.fft.rfftfreq(samples.shape[0], d=1.0 / sample_rate)
        decibels, total = _decibels_of_total(_pool_bands(power, bins, edges), settings["floor_db"])
        return decibels, total
    windows = frames(samples, settings["n_frames"])
    power = np.abs(np.fft.rfft(windows, axis=1)) ** 2
    bins = np.fft.rfftfreq(windows.shape[1], d=1.0 / sample_rate)
    decibels, total = _decibels_of_total(_pool_bands(power, bins, edges), settings["floor_db"])
    return decibels.ravel(), total


def recording_features(recording: Recording, settings: dict[str, Any]) -> tuple[np.ndarray, float]:
    """Preprocess a recording as ``settings`` say and compute its features.

    ``settings`` is the validated ``spectra`` section; returns the same as
    `compute_features`.
    """
    samples = preprocess(
        recording, settings["sample_rate"], settings["duration"], settings["smoothing_window"]
    )
    return compute_features(samples, settings)


# Largest change in level that `reconstruct_log_signal` applies to one band of
# one frame, in dB either way; keeps bands near the floor from exploding.
MAX_GAIN_DB = 40.0


def _band_gains(bins: np.ndarray, edges: np.ndarray, gain_db: np.ndarray) -> np.ndarray:
    """Spread per-band gains in dB (last axis) onto FFT bins as amplitude factors.

    Bins outside every band keep their level (factor 1).
    """
    band = np.searchsorted(edges, bins, side="right") - 1
    inside = (band >= 0) & (band < edges.shape[0] - 1)
    factors = np.ones(gain_db.shape[:-1] + bins.shape)
    clipped = np.clip(gain_db, -MAX_GAIN_DB, MAX_GAIN_DB)
    factors[..., inside] = 10 ** (clipped[..., band[inside]] / 20)
    return factors


def reconstruct_log_signal(
    samples: np.ndarray,
    features: np.ndarray,
    reconstructed: np.ndarray,
    settings: dict[str, Any],
) -> np.ndarray:
    """Build the waveform that a reconstruction of log-power features describes.

    Each band of the original is scaled by the difference in dB between the
    reconstructed and the original features, keeping the original phase.
    For ``log_bands`` the bands are those of the whole-window FFT. For
    ``log_tf`` they are those of each frame of `frames`, and the frames are
    added back together and divided by the summed windows. So a band the
    model expects quieter is turned down, and a signal whose features are
    reconstructed exactly comes back unchanged.

    Parameters
    ----------
    samples : np.ndarray [shape=(n,)]
        The preprocessed original signal.
    features, reconstructed : np.ndarray [shape=(n_features,)]
        The original features and their reconstruction, in dB.
    settings : dict
        The validated ``spectra`` section; ``kind`` is a log kind.

    Returns
    -------
    np.ndarray [shape=(n,)]
    """
    edges = band_edges(settings)
    sample_rate = settings["sample_rate"]
    gain_db = np.asarray(reconstructed, dtype=np.float64) - np.asarray(features, dtype=np.float64)
    if settings["kind"] == "log_bands":
        spectrum = np.fft.rfft(samples)
        bins = np.fft.rfftfreq(samples.shape[0], d=1.0 / sample_rate)
        return np.fft.irfft(spectrum * _band_gains(bins, edges, gain_db), n=samples.shape[0])
    n_frames = settings["n_frames"]
    hop = samples.shape[0] // n_frames
    length = 2 * hop
    window = np.hanning(length)
    windows = frames(samples, n_frames)
    bins = np.fft.rfftfreq(length, d=1.0 / sample_rate)
    factors = _band_gains(bins, edges, gain_db.reshape(n_frames, -1))
    changed = np.fft.irfft(np.fft.rfft(windows, axis=1) * factors, n=length, axis=1)
    total = np.zeros(samples.shape[0] + hop // 2 + length)
    weight = np.zeros_like(total)
    for index in range(n_frames):
        start = index * hop
        total[start : start + length] += changed[index]
        weight[start : start + length] += window
    total, weight = total[hop // 2 : hop // 2 + samples.shape[0]], weight[hop // 2 : hop // 2 + samples.shape[0]]
    # Samples that no frame covers (the far ends) keep their original value.
    covered = weight > 1e-3
    result = samples.astype(np.float64).copy()
    result[covered] = total[covered] / weight[covered]
    return result
