"""Feature kinds: FFT magnitude, log-power bands and log-power time-frequency."""

from __future__ import annotations

import numpy as np
import pytest

from audiomnist_anomalies.errors import AudioInputError
from audiomnist_anomalies.features import (
    MAX_GAIN_DB,
    compute_features,
    frames,
    layout,
    reconstruct_log_signal,
)
from audiomnist_anomalies.params import default_params, validate_params
from synthetic import tone

SAMPLE_RATE = 6800


def settings(kind: str, **changes) -> dict:
    values = validate_params(default_params())["spectra"]
    values.update(kind=kind, sample_rate=SAMPLE_RATE, max_frequency_hz=3200.0)
    values.update(changes)
    return values


def test_layouts_of_each_kind():
    fft = layout(settings("fft_magnitude"), 6800)
    bands = layout(settings("log_bands"), 6800)
    tf = layout(settings("log_tf"), 6800)

    assert (fft.n_frames, fft.n_features) == (1, 3401)
    assert (bands.n_frames, bands.n_features) == (1, 48)
    assert (tf.n_frames, tf.n_features) == (32, 32 * 48)
    assert bands.frequencies[0] > 50
    assert bands.frequencies[-1] < 3200
    assert np.all(np.diff(np.log(bands.frequencies)) == pytest.approx(np.log(64) / 48))


def test_log_bands_peak_at_tone():
    values, total = compute_features(tone(1000, 1.0, SAMPLE_RATE), settings("log_bands"))
    centres = layout(settings("log_bands"), 6800).frequencies

    assert values.shape == (48,)
    assert centres[np.argmax(values)] == pytest.approx(1000, rel=0.05)
    assert total > 0
    assert values.max() <= 1e-6


def test_log_features_ignore_gain():
    signal = tone(300, 1.0, SAMPLE_RATE) + 0.1 * tone(2000, 1.0, SAMPLE_RATE)
    quiet, _ = compute_features(0.01 * signal, settings("log_tf"))
    loud, _ = compute_features(signal, settings("log_tf"))

    assert np.allclose(quiet, loud, atol=1e-6)


def test_log_tf_sees_time_order():
    half = np.r_[tone(500, 0.5, SAMPLE_RATE), np.zeros(3400)]
    values, _ = compute_features(half, settings("log_tf"))
    image = values.reshape(32, 48)
    reversed_values, _ = compute_features(half[::-1], settings("log_tf"))

    assert image[:14].max(axis=1).min() > image[18:].max(axis=1).max() + 30
    assert not np.allclose(values, reversed_values)


def test_frames_cover_signal():
    windows = frames(np.ones(6800), 32)

    assert windows.shape == (32, 424)
    assert windows[5].max() == pytest.approx(1.0, abs=1e-3)


def test_per_frequency_averages_frames():
    tf = layout(settings("log_tf", n_frames=2, n_bands=3), 6800)
    values = np.array([[1.0, 2.0, 3.0, 3.0, 4.0, 5.0]])

    assert tf.per_frequency(values).tolist() == [[2.0, 3.0, 4.0]]


def test_silence_raises_for_log_kinds():
    with pytest.raises(AudioInputError, match="silent"):
        compute_features(np.zeros(6800), settings("log_bands"))


@pytest.mark.parametrize("kind", ["log_bands", "log_tf"])
def test_exact_reconstruction_gives_the_signal_back(kind):
    samples = np.random.default_rng(0).standard_normal(SAMPLE_RATE)
    values = settings(kind)
    features, _ = compute_features(samples, values)

    assert np.allclose(reconstruct_log_signal(samples, features, features, values), samples, atol=1e-12)


def test_reconstruction_turns_down_the_band_it_expects_quieter():
    samples = np.random.default_rng(1).standard_normal(SAMPLE_RATE)
    values = settings("log_tf")
    features, _ = compute_features(samples, values)
    expected = features.reshape(32, 48).copy()
    expected[:, 40] -= 20
    rebuilt = reconstruct_log_signal(samples, features, expected.ravel(), values)
    change = (compute_features(rebuilt, values)[0] - features).reshape(32, 48)[2:-2]

    # Window leakage from the neighbouring bands limits the drop below 20 dB.
    assert change[:, 40].mean() < -10
    assert np.abs(change[:, [10, 20, 30]]).mean() < 0.5


def test_reconstruction_gain_is_bounded():
    samples = np.random.default_rng(2).standard_normal(SAMPLE_RATE)
    values = settings("log_bands")
    features, _ = compute_features(samples, values)
    rebuilt = reconstruct_log_signal(samples, features, features + 300, values)

    # Every band raised by 300 dB is raised by MAX_GAIN_DB only.
    assert np.abs(rebuilt).max() < np.abs(samples).max() * 10 ** (MAX_GAIN_DB / 20) * 1.01
