"""PaCMAP maps on small and normal inputs, k-means clusters and error profiles."""

from __future__ import annotations

import numpy as np
import pytest

from audiomnist_anomalies.cluster import (
    cluster_map,
    describe_profile,
    draw_profiles,
    error_profiles,
    frequency_bands,
    profile_name,
)
from audiomnist_anomalies.errors import PipelineError
from audiomnist_anomalies.mapping import MIN_PACMAP_POINTS, pacmap_embedding, pair_counts

MAP_SETTINGS = dict(n_neighbors=10, mn_ratio=0.5, fp_ratio=2.0, random_state=42)


def blobs(n_points: int, dimensions: int = 300, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(3, dimensions)) * 5
    return centres[np.arange(n_points) % 3] + rng.normal(size=(n_points, dimensions))


# The first call compiles PaCMAP's kernels, which takes up to a minute on a cold cache.
@pytest.mark.timeout(300)
@pytest.mark.parametrize("n_points", [1, 2, 5, 8, 10, 20, 30, 100])
def test_small_inputs_finish(n_points):
    embedding, method = pacmap_embedding(
        blobs(n_points), **MAP_SETTINGS, parameter_prefix="embed"
    )

    assert embedding.shape == (n_points, 2)
    assert np.all(np.isfinite(embedding))
    assert method == ("pacmap" if n_points >= MIN_PACMAP_POINTS else "pca")


def test_empty_input_raises():
    with pytest.raises(PipelineError, match="empty"):
        pacmap_embedding(np.zeros((0, 5)), **MAP_SETTINGS, parameter_prefix="embed")


@pytest.mark.parametrize("n_points", range(MIN_PACMAP_POINTS, 60))
def test_pair_counts_never_exhaust_points(n_points):
    neighbors, mid_near, further = pair_counts(n_points, 10, 0.5, 2.0)

    assert neighbors >= 1
    assert neighbors + further + 1 <= n_points
    assert mid_near == 0 or mid_near + 6 <= n_points
    assert neighbors + mid_near + further < n_points


def test_pair_counts_keep_defaults_when_possible():
    assert pair_counts(3000, 10, 0.5, 2.0) == (10, 5, 20)


@pytest.mark.timeout(300)
def test_embedding_is_reproducible_and_separates_groups():
    features = blobs(150)
    first, _ = pacmap_embedding(features, **MAP_SETTINGS, parameter_prefix="embed")
    second, _ = pacmap_embedding(features, **MAP_SETTINGS, parameter_prefix="embed")
    labels, _ = cluster_map(first, 3, 42)
    truth = np.arange(150) % 3

    assert np.array_equal(first, second)
    for group in range(3):
        assert len(set(labels[truth == group])) == 1


def test_clusters_numbered_by_size():
    points = np.r_[np.zeros((5, 2)), np.full((20, 2), 10.0), np.full((10, 2), -10.0)]
    points += np.random.default_rng(0).normal(scale=0.1, size=points.shape)
    labels, distances = cluster_map(points, 3, 42)

    assert np.bincount(labels).tolist() == [20, 10, 5]
    assert distances.max() < 1.0


def test_error_profiles_average_members():
    errors = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 5.0]])
    profiles = error_profiles(errors, np.array([0, 0, 1]), 2)

    assert profiles.tolist() == [[2.0, 0.0], [0.0, 5.0]]


def test_bands_end_at_nyquist():
    assert frequency_bands([0, 120, 250, 4000], 3400.000000000001) == [
        (0, 120),
        (120, 250),
        (250, 3400.000000000001),
    ]


def test_profile_with_low_frequency_excess():
    frequencies = np.arange(0, 3401, dtype=float)
    reference = np.ones_like(frequencies)
    profile = reference.copy()
    profile[frequencies < 120] = 10.0
    bands = frequency_bands([0, 120, 250, 500, 1000, 2000], 3400.0)
    description = describe_profile(profile, reference, frequencies, bands)

    assert description["excess_band_hz"] == [0.0, 120.0]
    assert description["excess_ratio"] == pytest.approx(10.0)
    assert description["dominant_band_hz"] == [2000.0, 3400.0]
    assert description["peak_frequency_hz"] == 0.0
    assert profile_name(description, float(reference.mean())) == "excess below 120 Hz (10.0x)"


def test_profile_below_mean_is_typical():
    description = {"mean_error": 0.5, "excess_band_hz": [0.0, 120.0], "excess_ratio": 0.6}

    assert profile_name(description, 1.0) == "typical (0.5x mean error)"


def test_profile_names_of_the_top_band_and_broadband():
    frequencies = np.linspace(50, 6648.79, 48)
    reference = np.ones(48)
    bands = frequency_bands([0, 120, 250, 500, 1000, 2000, 4000], float(frequencies[-1]))
    high = describe_profile(np.where(frequencies >= 4000, 4.0, 1.2), reference, frequencies, bands)
    even = describe_profile(np.full(48, 2.0), reference, frequencies, bands)

    assert profile_name(high, 1.0) == "excess above 4000 Hz (4.0x)"
    assert profile_name(even, 1.0) == "broadband (2.0x mean error)"


def test_band_profiles_drawn_unsmoothed_on_log_axis():
    from audiomnist_anomalies.plotting import plt

    centres = np.geomspace(53, 6649, 48)
    profiles = np.ones((2, 48))
    profiles[1, 3] = 10.0
    figure = draw_profiles(profiles, np.ones(48), centres, ["a", "b"])
    ratio = figure.axes[1].get_lines()[1].get_ydata()

    assert figure.axes[1].get_xscale() == "log"
    # One band ten times the mean stays one band: no smoothing across bands.
    assert ratio[3] == pytest.approx(10.0)
    assert ratio[2] == pytest.approx(1.0)
    plt.close(figure)


def test_fft_profiles_drawn_smoothed_on_linear_axis():
    from audiomnist_anomalies.plotting import plt

    frequencies = np.arange(0, 3401, dtype=float)
    profiles = np.ones((2, 3401))
    profiles[1, 1000] = 26.0
    figure = draw_profiles(profiles, np.ones(3401), frequencies, ["a", "b"])
    ratio = figure.axes[1].get_lines()[1].get_ydata()

    assert figure.axes[1].get_xscale() == "linear"
    # A 25-bin moving average spreads the peak: (26 + 24) / 25 = 2.
    assert ratio[1000] == pytest.approx(2.0)
    plt.close(figure)


def test_narrow_excess_named_below_mean_error():
    description = {
        "mean_error": 0.8,
        "excess_band_hz": [1000.0, 2000.0],
        "excess_ratio": 1.7,
        "lowest_ratio": 0.6,
        "excess_is_last_band": False,
    }

    assert profile_name(description, 1.0) == "excess 1000-2000 Hz (1.7x)"
    assert profile_name(dict(description, excess_ratio=1.4), 1.0) == "typical (0.8x mean error)"


def test_log_band_shares_weigh_band_width():
    centres = np.geomspace(50, 6649, 48)
    bands = frequency_bands([0, 120, 250, 500, 1000, 2000, 4000], float(centres[-1]))
    description = describe_profile(np.ones(48), np.ones(48), centres, bands)

    # An even profile over log-spaced bands has most of its error in the
    # widest band, 4000 Hz to the top, not in the many narrow low columns.
    assert description["dominant_band_hz"] == [4000.0, float(centres[-1])]
