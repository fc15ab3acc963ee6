"""Stage ``cluster``: group recordings by where in frequency their spectra fail to fit.

The per-frequency reconstruction errors from the detect stage are mapped
to two dimensions with PaCMAP and clustered with k-means on that map. The
mean error per frequency of each cluster (its error profile) shows which
part of the spectrum sets its members apart, which is the start of a
classification of anomaly types without labels.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.metrics import silhouette_score
from threadpoolctl import threadpool_limits

from .cli import exit_with, run_stage
from .errors import PipelineError
from .mapping import pacmap_embedding
from .outputs import (
    atomic_path,
    load_npy,
    read_csv,
    row_batches,
    take_rows,
    save_figure,
    write_csv,
    write_json,
)

log = logging.getLogger("audiomnist_anomalies.cluster")

ERRORS_PATH = Path("data/errors.npy")
FREQUENCIES_PATH = Path("data/frequencies.npy")
SCORES_PATH = Path("data/scores.csv")
CLUSTERS_PATH = Path("data/clusters.csv")
PROFILES_PATH = Path("plots/error_profiles.csv")
MAP_FIGURE_PATH = Path("plots/error_map.png")
PROFILES_FIGURE_PATH = Path("plots/error_profiles.png")
METRICS_PATH = Path("metrics/cluster.json")
CLASSIFIER_PATH = Path("data/cluster_classifier.joblib")
CV_FOLDS = 5
# 50 components gave a cross-validated accuracy of 0.744 against 0.735 for 100
# on the 3,000 real recordings, and the cross-validation took 1.8 s instead of 4.4 s.
CLASSIFIER_COMPONENTS = 50
# A cluster at or below the mean error is still named by its band when its
# error there is at least this many times the overall profile's.
NARROW_EXCESS = 1.5
# A cluster above the mean error whose smallest band ratio is at least this
# share of its largest is named "broadband".
BROADBAND_EVENNESS = 0.75
# Width of the moving average applied before dividing profiles, in Hz.
RATIO_SMOOTHING_HZ = 25.0


def cluster_map(
    embedding: np.ndarray, n_clusters: int, random_state: int, stage: str = "cluster"
) -> tuple[np.ndarray, np.ndarray]:
    """Cluster map coordinates with k-means.

    ``stage`` names the stage in the warning about empty clusters; only the
    cluster stage takes its count from ``cluster.n_clusters``.

    Returns
    -------
    labels : np.ndarray [shape=(n,), dtype=int]
        Cluster of each point, numbered by decreasing cluster size.
    distances : np.ndarray [shape=(n,)]
        Distance of each point to its cluster centre.
    """
    model = KMeans(n_clusters=n_clusters, random_state=random_state, n_init=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        labels = model.fit_predict(embedding.astype(np.float64))
    if any(issubclass(warning.category, ConvergenceWarning) for warning in caught):
        log.warning(
            "%s: the map has fewer distinct points than the %d clusters asked for, "
            "so some clusters are empty%s",
            stage,
            n_clusters,
            "; lower cluster.n_clusters" if stage == "cluster" else "",
        )
    distances = np.linalg.norm(embedding - model.cluster_centers_[labels], axis=1)
    # Renumber so cluster 0 is the largest; ties keep k-means order.
    sizes = np.bincount(labels, minlength=n_clusters)
    order = sorted(range(n_clusters), key=lambda label: (-sizes[label], label))
    renumber = np.empty(n_clusters, dtype=int)
    renumber[order] = np.arange(n_clusters)
    return renumber[labels], distances


def error_profiles(errors: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """Return the mean per-frequency error of each cluster, shape (n_clusters, n_freq).

    The errors are read in batches, so a memory map is never loaded whole.
    """
    sums = np.zeros((n_clusters, errors.shape[1]))
    for start, rows in row_batches(errors):
        batch_labels = labels[start : start + rows.shape[0]]
        for label in np.unique(batch_labels):
            sums[label] += rows[batch_labels == label].sum(axis=0, dtype=np.float64)
    sizes = np.bincount(labels, minlength=n_clusters)
    return sums / np.maximum(sizes, 1)[:, np.newaxis]


def nearest_profile_agreement(
    errors: np.ndarray, labels: np.ndarray, profiles: np.ndarray, batch: int = 1024
) -> float:
    """Return the share of recordings whose nearest mean profile is their own cluster's.

    This is how well the rule that the score command uses for new recordings
    reproduces the k-means clusters.
    """
    hits = 0
    for start, rows in row_batches(errors, batch):
        block = rows.astype(np.float64)
        distances = (
            (block**2).sum(axis=1)[:, np.newaxis]
            - 2 * block @ profiles.T
            + (profiles**2).sum(axis=1)[np.newaxis, :]
        )
        hits += int((distances.argmin(axis=1) == labels[start : start + rows.shape[0]]).sum())
    return round(hits / errors.shape[0], 4)


def fit_classifier(
    errors: np.ndarray, labels: np.ndarray, random_state: int, max_fit: int | None = None
) -> tuple[Pipeline, float | None]:
    """Train a classifier that assigns a cluster to any per-frequency error profile.

    It is a logistic regression on the first principal components of the
    errors, standardized, so that new recordings get a cluster without
    rerunning PaCMAP and k-means.

    With more than ``max_fit`` recordings, it is trained and cross-validated
    on a seeded sample of ``max_fit``.

    Returns
    -------
    classifier : Pipeline
        Fitted on all recordings, or on the sample.
    accuracy : float or None
        Mean accuracy of 5-fold stratified cross-validation, or None when a
        cluster has fewer than 5 members.
    """
    if max_fit is not None and labels.shape[0] > max_fit:
        generator = np.random.default_rng(random_state)
        sample = np.sort(generator.choice(labels.shape[0], size=max_fit, replace=False))
        errors, labels = take_rows(errors, sample), labels[sample]
    features = np.asarray(errors, dtype=np.float64)
    # PCA keeps the fit fast and stable; each cross-validation fold trains on 4/5.
    components = max(1, min(CLASSIFIER_COMPONENTS, features.shape[1], len(labels) * 4 // 5 - 1))
    classifier = make_pipeline(
        PCA(n_components=components, random_state=random_state),
        StandardScaler(),
        LogisticRegression(max_iter=2000, random_state=random_state),
    )
    accuracy = None
    counts = np.bincount(labels)
    # The matrices are small: with one BLAS thread the fits run over ten
    # times faster on 2 cores than with threads that wait on each other.
    with warnings.catch_warnings(), threadpool_limits(limits=1, user_api="blas"):
        warnings.simplefilter("ignore", ConvergenceWarning)
        if len(counts[counts > 0]) > 1 and counts[counts > 0].min() >= CV_FOLDS:
            folds = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=random_state)
            scores = cross_val_score(classifier, features, labels, cv=folds)
            accuracy = round(float(scores.mean()), 4)
        classifier.fit(features, labels)
    return classifier, accuracy


def frequency_bands(edges_hz: list[float], nyquist_hz: float) -> list[tuple[float, float]]:
    """Cut the configured band edges at the Nyquist frequency.

    The last band always ends at the Nyquist frequency, so every spectrum
    column belongs to exactly one band.
    """
    # The FFT's last frequency can exceed the Nyquist frequency by a rounding error.
    inner = [edge for edge in edges_hz if edge < nyquist_hz * (1 - 1e-9)]
    bounds = inner + [nyquist_hz]
    return list(zip(bounds[:-1], bounds[1:]))


def describe_profile(
    profile: np.ndarray,
    reference: np.ndarray,
    frequencies: np.ndarray,
    bands: list[tuple[float, float]],
) -> dict[str, Any]:
    """Summarize one error profile by frequency band.

    Parameters
    ----------
    profile : np.ndarray [shape=(n_freq,)]
        Mean error per frequency of one cluster.
    reference : np.ndarray [shape=(n_freq,)]
        Mean error per frequency over all recordings.
    frequencies : np.ndarray [shape=(n_freq,)]
        Frequency of each column in Hz.
    bands : list of (low, high)
        Frequency bands in Hz; the last one includes its upper edge.

    Returns
    -------
    dict
        ``dominant_band_hz``: band with the largest share of the profile's
        total error, and that share. ``excess_band_hz``: band where the
        profile exceeds the reference the most, and the ratio;
        ``lowest_ratio``, the ratio in the band where it exceeds it least.
        ``peak_frequency_hz``: frequency of the largest error.
    """
    shares, ratios = [], []
    # Each column counts with the width of spectrum it covers: equal for FFT
    # bins, growing with frequency for log-spaced bands, whose low columns
    # are narrow and many.
    widths = np.gradient(frequencies) if frequencies.size > 1 else np.ones(1)
    weighted, weighted_reference = profile * widths, reference * widths
    total = float(weighted.sum())
    for index, (low, high) in enumerate(bands):
        last = index == len(bands) - 1
        inside = (frequencies >= low) & ((frequencies <= high) if last else (frequencies < high))
        band_error = float(weighted[inside].sum())
        reference_error = float(weighted_reference[inside].sum())
        shares.append(band_error / total if total > 0 else 0.0)
        ratios.append(band_error / reference_error if reference_error > 0 else 0.0)
    dominant = int(np.argmax(shares))
    excess = int(np.argmax(ratios))
    return {
        "dominant_band_hz": [float(bands[dominant][0]), float(bands[dominant][1])],
        "dominant_band_share": round(shares[dominant], 4),
        "excess_band_hz": [float(bands[excess][0]), float(bands[excess][1])],
        "excess_ratio": round(ratios[excess], 4),
        "lowest_ratio": round(min(ratios), 4),
        "excess_is_last_band": excess == len(bands) - 1,
        "peak_frequency_hz": round(float(frequencies[int(np.argmax(profile))]), 3),
        "mean_error": float(profile.mean()),
    }


def profile_name(description: dict[str, Any], overall_mean_error: float) -> str:
    """Name a cluster from its profile.

    A cluster whose mean error is at most the overall mean, and no band
    above `NARROW_EXCESS` times the overall profile, is "typical".
    One that exceeds the overall profile nearly evenly in every band (the
    smallest ratio at least `BROADBAND_EVENNESS` of the largest) is
    "broadband". Any other is named by the band where it exceeds the overall
    profile the most: "excess below 120 Hz (3.1x)" for the lowest band,
    "excess above 4000 Hz" for the highest, "excess 500-1000 Hz" between.
    """
    level = description["mean_error"] / overall_mean_error if overall_mean_error > 0 else 0
    ratio = description["excess_ratio"]
    if level <= 1.0 and ratio < NARROW_EXCESS:
        return f"typical ({level:.1f}x mean error)"
    if description.get("lowest_ratio", 0.0) >= BROADBAND_EVENNESS * ratio:
        return f"broadband ({level:.1f}x mean error)"
    low, high = description["excess_band_hz"]
    if low == 0:
        return f"excess below {high:.0f} Hz ({ratio:.1f}x)"
    if description.get("excess_is_last_band", False):
        return f"excess above {low:.0f} Hz ({ratio:.1f}x)"
    return f"excess {low:.0f}-{high:.0f} Hz ({ratio:.1f}x)"


def draw_map(embedding: np.ndarray, labels: np.ndarray, names: list[str], title: str):
    """Draw the error map with one colour per cluster and its name in the legend."""
    from .plotting import plt

    figure, axes = plt.subplots(figsize=(9, 6.5))
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    for label, name in enumerate(names):
        members = labels == label
        axes.scatter(
            embedding[members, 0],
            embedding[members, 1],
            s=8,
            color=colours(label % colours.N),
            label=f"{label}: n={int(members.sum())}, {name}",
            alpha=0.8,
            linewidths=0,
        )
        if members.any():
            centre = embedding[members].mean(axis=0)
            axes.annotate(
                str(label), centre, fontsize=11, fontweight="bold", ha="center", va="center"
            )
    axes.legend(fontsize=7, markerscale=2, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes.set_xlabel("PaCMAP 1")
    axes.set_ylabel("PaCMAP 2")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def draw_profiles(
    profiles: np.ndarray, reference: np.ndarray, frequencies: np.ndarray, names: list[str]
):
    """Draw every cluster's mean error profile and its ratio to the overall profile.

    The top panel shows the mean squared error per frequency on a log scale.
    The bottom panel divides each profile by the mean over all recordings,
    so the bands that set a cluster apart stand out. FFT frequencies, evenly
    spaced, are smoothed over about 25 Hz first. Log-spaced band centres are
    drawn on a log frequency axis and not smoothed, since each band already
    averages many FFT bins.
    """
    from .plotting import plt

    figure, axes = plt.subplots(2, 1, figsize=(10, 8), sharex=True)
    colours = plt.get_cmap("tab20" if len(names) > 10 else "tab10")
    floor = np.finfo(np.float32).tiny
    steps = np.diff(frequencies)
    evenly_spaced = steps.size == 0 or np.allclose(steps, steps[0], rtol=1e-6)
    width = 1
    if evenly_spaced and steps.size:
        width = max(1, int(round(RATIO_SMOOTHING_HZ / float(steps[0]))))
    kernel = np.ones(width) / width
    smoothed_reference = np.convolve(reference, kernel, mode="same")
    for label, name in enumerate(names):
        colour = colours(label % colours.N)
        axes[0].plot(
            frequencies,
            np.maximum(profiles[label], floor),
            lw=0.8,
            color=colour,
            label=f"{label}: {name}",
        )
        ratio = np.convolve(profiles[label], kernel, mode="same") / np.maximum(
            smoothed_reference, floor
        )
        axes[1].plot(frequencies, np.maximum(ratio, 1e-3), lw=0.9, color=colour)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean squared reconstruction error")
    axes[0].set_title("Mean reconstruction error per frequency, by cluster")
    axes[0].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axes[1].set_yscale("log")
    axes[1].axhline(1.0, color="black", lw=0.6)
    axes[1].set_xlabel("frequency (Hz)")
    axes[1].set_ylabel("ratio to the mean over all recordings")
    if not evenly_spaced:
        axes[1].set_xscale("log")
    figure.tight_layout()
    return figure


def cluster(params: dict[str, dict[str, Any]]) -> str:
    """Run the cluster stage with validated parameters; return its summary line."""
    settings = params["cluster"]
    errors = load_npy(ERRORS_PATH, mmap=True)
    max_fit = params["compute"]["max_fit_recordings"]
    frequencies = load_npy(FREQUENCIES_PATH)
    scores = read_csv(SCORES_PATH)
    n_recordings = errors.shape[0]
    n_clusters = settings["n_clusters"]
    if n_clusters > n_recordings:
        raise PipelineError(
            f"cluster.n_clusters = {n_clusters} exceeds the {n_recordings} recordings; "
            "lower it in params.yaml"
        )
    if len(scores) != n_recordings or frequencies.shape[0] != errors.shape[1]:
        raise PipelineError(
            f"{ERRORS_PATH}, {FREQUENCIES_PATH} and {SCORES_PATH} disagree in shape; "
            "rerun the pipeline (dvc repro)"
        )
    log.info(
        "cluster: PaCMAP of %d error profiles, %d clusters", n_recordings, n_clusters
    )
    embedding, method = pacmap_embedding(
        errors,
        n_neighbors=settings["n_neighbors"],
        mn_ratio=settings["mn_ratio"],
        fp_ratio=settings["fp_ratio"],
        random_state=settings["random_state"],
        parameter_prefix="cluster",
        max_fit=max_fit,
    )
    labels, distances = cluster_map(embedding, n_clusters, settings["random_state"])
    profiles = error_profiles(errors, labels, n_clusters)
    sizes = np.bincount(labels, minlength=n_clusters)
    reference = sizes @ profiles / n_recordings
    bands = frequency_bands(settings["band_edges_hz"], float(frequencies[-1]))
    dropped = [edge for edge in settings["band_edges_hz"] if edge > frequencies[-1] + 1e-6]
    if dropped:
        log.warning(
            "cluster.band_edges_hz: %s lie above the error profile's highest "
            "frequency %.0f Hz and "
            "are ignored",
            dropped,
            frequencies[-1],
        )
    descriptions = [
        describe_profile(profile, reference, frequencies, bands) for profile in profiles
    ]
    names = [
        profile_name(description, float(reference.mean())) for description in descriptions
    ]
    agreement = nearest_profile_agreement(errors, labels, profiles)
    classifier, accuracy = fit_classifier(errors, labels, settings["random_state"], max_fit)
    silhouette = None
    if 2 <= n_clusters < n_recordings and len(np.unique(labels)) > 1:
        # The silhouette compares all pairs of points; above max_fit it is
        # estimated on a seeded sample of that many.
        sample_size = max_fit if n_recordings > max_fit else None
        silhouette = round(
            float(
                silhouette_score(
                    embedding, labels, sample_size=sample_size, random_state=settings["random_state"]
                )
            ),
            6,
        )

    write_csv(
        CLUSTERS_PATH,
        ("recording_id", "cluster", "x", "y", "distance_to_centre"),
        (
            (
                row["recording_id"],
                int(labels[i]),
                float(embedding[i, 0]),
                float(embedding[i, 1]),
                float(distances[i]),
            )
            for i, row in enumerate(scores)
        ),
    )
    write_csv(
        PROFILES_PATH,
        ("frequency_hz", "cluster", "mean_error"),
        (
            (float(frequencies[column]), f"cluster {label}", float(profiles[label, column]))
            for label in range(n_clusters)
            for column in range(frequencies.shape[0])
        ),
    )
    save_figure(
        draw_map(embedding, labels, names, f"Map of reconstruction errors ({method}), k-means"),
        MAP_FIGURE_PATH,
    )
    with atomic_path(CLASSIFIER_PATH) as temporary:
        joblib.dump(classifier, temporary)
    save_figure(draw_profiles(profiles, reference, frequencies, names), PROFILES_FIGURE_PATH)
    write_json(
        METRICS_PATH,
        {
            "n_clusters": n_clusters,
            "method": method,
            "silhouette": silhouette,
            "nearest_profile_agreement": agreement,
            "classifier_cv_accuracy": accuracy,
            "sizes": {str(label): int(size) for label, size in enumerate(sizes)},
            "clusters": {
                str(label): dict(description, name=names[label], size=int(sizes[label]))
                for label, description in enumerate(descriptions)
            },
        },
    )
    return (
        f"{n_clusters} clusters of sizes {', '.join(str(int(size)) for size in sizes)}; "
        f"silhouette {silhouette}; classifier cross-validated accuracy "
        + (f"{accuracy}" if accuracy is not None else "not measured (a cluster has fewer than 5 members)")
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the cluster stage."""
    return run_stage(
        "cluster",
        "Map the per-frequency reconstruction errors with PaCMAP, cluster the map "
        "with k-means and summarize each cluster's error profile.",
        lambda params, options: cluster(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
