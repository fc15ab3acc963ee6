"""Stage ``evaluate``: measure the detectors on recordings with known defects.

The stage corrupts a seeded share (``evaluate.fraction``) of the usable
recordings with the defect types in ``evaluate.defects`` (see `defects`),
the types spread evenly over the corrupted recordings. It then computes the
same features and runs the same detectors as the main pipeline on that set.
For each detector, overall and per defect type, it measures how well the
corrupted recordings rank above the clean ones: ROC AUC, average precision,
and precision among the top k, with k the number of corrupted recordings.
The combined score is the mean of the two detectors' rank percentiles.
The main pipeline's outputs are never touched, and the features follow
``spectra.kind`` like the main pipeline's.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import (
    adjusted_rand_score,
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from .audio import Recording, preprocess, read_wav, window_length
from .cli import exit_with, run_stage
from .defects import DEFECTS, quantize_16_bit
from .detect import detect_anomalies
from .errors import AudioInputError, PipelineError
from .features import compute_features
from .features import layout as feature_layout
from .outputs import read_csv, take_rows, write_csv, write_json

log = logging.getLogger("audiomnist_anomalies.evaluate")

RAW_DIR = Path("data/raw")
RECORDINGS_PATH = Path("data/recordings.csv")
SCORES_PATH = Path("data/evaluate/scores.csv")
METRICS_PATH = Path("metrics/evaluate.json")
ROC_PATH = Path("plots/evaluate_roc.csv")
PR_PATH = Path("plots/evaluate_pr.csv")
DETECTORS = ("isolation_forest", "reconstruction_error", "combined")
CLEAN = "clean"
# Added to squared errors before log10, so that zero errors stay finite.
ERROR_FLOOR = 1e-12
# Curves are sampled on this many evenly spaced points so the CSVs stay small.
CURVE_POINTS = 101


def assign_defects(
    n_recordings: int, fraction: float, defects: list[str], random_state: int
) -> list[str]:
    """Choose which recordings to corrupt and with which defect.

    Returns
    -------
    list of str
        ``"clean"`` or a defect name for every recording. The number of
        corrupted recordings is ``round(fraction * n)`` (at least one per
        defect type when there are enough recordings), and the types are
        dealt out in turn so each has nearly the same count.
    """
    rng = np.random.default_rng(random_state)
    count = int(round(fraction * n_recordings))
    count = min(max(count, len(defects)), n_recordings - 1)
    if count < 1:
        raise PipelineError(
            f"evaluate needs at least 2 recordings to corrupt one, got {n_recordings}"
        )
    chosen = rng.choice(n_recordings, size=count, replace=False)
    labels = [CLEAN] * n_recordings
    for position, index in enumerate(chosen):
        labels[int(index)] = defects[position % len(defects)]
    return labels


def defect_arguments(settings: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Map each defect name to its severity keyword arguments from ``params.yaml``."""
    return {
        "noise": {"snr_db": settings["noise_snr_db"]},
        "hum": {"frequency_hz": settings["hum_frequency_hz"], "snr_db": settings["hum_snr_db"]},
        "clipping": {"level": settings["clipping_level"]},
        "low_pass": {"cutoff_hz": settings["low_pass_hz"]},
        "high_pass": {"cutoff_hz": settings["high_pass_hz"]},
        "cut_off": {"keep": settings["cut_off_keep"]},
        "reversed": {},
        "speed": {"factor": settings["speed_factor"]},
        "near_silence": {"gain_db": settings["near_silence_db"]},
        "dc_offset": {"offset": settings["dc_offset"]},
        "second_voice": {"level_db": settings["second_voice_db"]},
    }


def corrupt(
    paths: list[Path],
    speakers: list[str],
    labels: list[str],
    settings: dict[str, Any],
) -> Iterator[Recording]:
    """Read each recording, apply its defect and quantize the result to 16 bits.

    Yields the recordings one at a time, in order, so only one (and the
    voice mixed into it) is in memory. The second voice comes from a
    randomly chosen clean recording of another speaker, resampled to the
    corrupted recording's rate.
    """
    from .audio import resample

    rng = np.random.default_rng(settings["random_state"] + 1)
    arguments = defect_arguments(settings)
    clean = [index for index, label in enumerate(labels) if label == CLEAN]
    for index, (path, label) in enumerate(zip(paths, labels)):
        recording = _reread(path)
        if label == CLEAN:
            yield recording
            continue
        extra = dict(arguments[label])
        if label == "second_voice":
            others = [i for i in clean if speakers[i] != speakers[index]] or clean
            other = _reread(paths[int(rng.choice(others))])
            extra["other"] = resample(other.samples, other.sample_rate, recording.sample_rate)
        samples = DEFECTS[label](recording.samples, recording.sample_rate, rng, **extra)
        yield Recording(
            quantize_16_bit(samples), recording.sample_rate, recording.channels, recording.encoding
        )


def _reread(path: Path) -> Recording:
    try:
        return read_wav(path)
    except AudioInputError as error:
        raise PipelineError(f"cannot reread {path}: {error}; rerun dvc repro") from None


def precision_at_k(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Share of true anomalies among the k highest scores, k = number of anomalies."""
    k = int(is_anomaly.sum())
    if k == 0:
        return float("nan")
    top = np.argsort(-scores, kind="stable")[:k]
    return float(is_anomaly[top].mean())


def detection_quality(is_anomaly: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """ROC AUC, average precision and precision at k of one score."""
    return {
        "roc_auc": round(float(roc_auc_score(is_anomaly, scores)), 4),
        "average_precision": round(float(average_precision_score(is_anomaly, scores)), 4),
        "precision_at_k": round(precision_at_k(is_anomaly, scores), 4),
        "anomalies": int(is_anomaly.sum()),
    }


def rank_average(*scores: np.ndarray) -> np.ndarray:
    """Mean of the rank percentiles of several scores (higher is more anomalous)."""
    return np.mean([rankdata(score) / score.shape[0] for score in scores], axis=0)


def evaluate_scores(labels: list[str], scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """Measure every detector overall and per defect type (that type against clean)."""
    labels_array = np.array(labels)
    is_anomaly = labels_array != CLEAN
    types = sorted(set(labels) - {CLEAN})
    result: dict[str, Any] = {}
    for detector, score in scores.items():
        result[detector] = {"overall": detection_quality(is_anomaly, score)}
        for defect in types:
            subset = (labels_array == CLEAN) | (labels_array == defect)
            result[detector][defect] = detection_quality(
                labels_array[subset] == defect, score[subset]
            )
    return result


def purity(truth: list[str], clusters: np.ndarray) -> float:
    """Share of recordings whose cluster's most common true label is their own."""
    total = 0
    for label in np.unique(clusters):
        members = [truth[i] for i in np.flatnonzero(clusters == label)]
        total += max(members.count(name) for name in set(members))
    return total / len(truth)


def map_and_cluster(
    values: np.ndarray, n_clusters: int, settings: dict[str, Any], max_fit: int | None = None
) -> np.ndarray:
    """Map rows with PaCMAP and cluster the map with k-means, as the cluster stage does."""
    from .cluster import cluster_map
    from .mapping import pacmap_embedding

    embedding, _ = pacmap_embedding(
        values,
        n_neighbors=settings["n_neighbors"],
        mn_ratio=settings["mn_ratio"],
        fp_ratio=settings["fp_ratio"],
        random_state=settings["random_state"],
        parameter_prefix="cluster",
        max_fit=max_fit,
        stage="evaluate",
    )
    return cluster_map(embedding, n_clusters, settings["random_state"], stage="evaluate")[0]


def type_recovery(
    errors: np.ndarray, labels: list[str], settings: dict[str, Any], max_fit: int | None = None
) -> dict[str, Any]:
    """Measure how well the error-profile clusters separate the planted defect types.

    The per-frequency errors are mapped and clustered exactly as the cluster
    stage does. Among the corrupted recordings, the adjusted Rand index and
    the purity compare the clusters with the true defect types. Each cluster
    is also listed with the defect types of its corrupted members.
    """
    n_clusters = min(settings["n_clusters"], errors.shape[0])
    clusters = map_and_cluster(errors, n_clusters, settings, max_fit)
    corrupted = [index for index, label in enumerate(labels) if label != CLEAN]
    truth = [labels[index] for index in corrupted]
    found = clusters[corrupted]
    members = {
        str(label): dict(
            sorted(
                (name, int(sum(1 for i in corrupted if clusters[i] == label and labels[i] == name)))
                for name in set(truth)
                if any(clusters[i] == label and labels[i] == name for i in corrupted)
            )
        )
        for label in range(n_clusters)
    }
    return {
        "adjusted_rand_index": round(float(adjusted_rand_score(truth, found)), 4),
        "purity": round(purity(truth, found), 4),
        "defects_by_cluster": members,
    }


def flagged_type_recovery(
    errors: np.ndarray,
    labels: list[str],
    scores: np.ndarray,
    settings: dict[str, Any],
    frequencies: np.ndarray | None = None,
) -> dict[str, Any]:
    """Measure type recovery when only the most anomalous recordings are clustered.

    The k recordings with the highest ``scores`` are kept, k being the
    number of corrupted recordings, as a detector's flags would keep them.
    Their error profiles, in log10, are mapped with PaCMAP and cut into one
    k-means cluster per planted defect type. The adjusted Rand index and the
    purity are measured among the corrupted recordings in that set; the
    clean ones there are the detector's false alarms.

    With ``frequencies`` (Hz of each error column) every cluster is also
    named from its mean error profile against the mean over all recordings,
    as the cluster stage names its clusters, and listed with its members'
    true labels, so the names can be checked against the planted types.
    """
    labels_array = np.array(labels)
    count = int((labels_array != CLEAN).sum())
    top = np.sort(np.argsort(-scores, kind="stable")[:count])
    profiles = np.log10(take_rows(errors, top).astype(np.float64) + ERROR_FLOOR)
    n_clusters = min(len(set(labels) - {CLEAN}), count)
    clusters = map_and_cluster(profiles, n_clusters, settings)
    corrupted = labels_array[top] != CLEAN
    truth = list(labels_array[top][corrupted])
    result: dict[str, Any] = {
        "flagged": count,
        "corrupted_among_flagged": int(corrupted.sum()),
        "n_clusters": n_clusters,
        "adjusted_rand_index": None,
        "purity": None,
    }
    if truth:
        found = clusters[corrupted]
        result["adjusted_rand_index"] = round(float(adjusted_rand_score(truth, found)), 4)
        result["purity"] = round(purity(truth, found), 4)
    if frequencies is not None:
        result["clusters"] = named_clusters(
            errors, top, clusters, list(labels_array[top]), frequencies, settings["band_edges_hz"]
        )
    return result


def named_clusters(
    errors: np.ndarray,
    members: np.ndarray,
    clusters: np.ndarray,
    truth: list[str],
    frequencies: np.ndarray,
    band_edges_hz: list[float],
) -> dict[str, dict[str, Any]]:
    """Name each cluster of ``members`` from its mean error profile; list its true labels."""
    from .cluster import describe_profile, frequency_bands, profile_name

    reference = np.zeros(errors.shape[1])
    for start in range(0, errors.shape[0], 4096):
        reference += np.asarray(errors[start : start + 4096], dtype=np.float64).sum(axis=0)
    reference /= errors.shape[0]
    bands = frequency_bands(band_edges_hz, float(frequencies[-1]))
    rows = take_rows(errors, members).astype(np.float64)
    named = {}
    for label in np.unique(clusters):
        inside = clusters == label
        description = describe_profile(rows[inside].mean(axis=0), reference, frequencies, bands)
        counts: dict[str, int] = {}
        for name in np.array(truth)[inside]:
            counts[str(name)] = counts.get(str(name), 0) + 1
        named[str(int(label))] = {
            "name": profile_name(description, float(reference.mean())),
            "size": int(inside.sum()),
            "labels": dict(sorted(counts.items(), key=lambda item: (-item[1], item[0]))),
        }
    return named


def sampled_curves(
    is_anomaly: np.ndarray, scores: dict[str, np.ndarray]
) -> tuple[list[list[float]], list[list[float]]]:
    """Sample ROC and interpolated precision-recall curves on a fixed grid.

    Returns rows of (false positive rate, true positive rate per detector)
    and (recall, precision per detector). Interpolated precision at recall r
    is the highest precision at any recall of at least r.
    """
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    roc_rows = [[float(x)] for x in grid]
    pr_rows = [[float(x)] for x in grid]
    for score in scores.values():
        false_positive, true_positive, _ = roc_curve(is_anomaly, score)
        tpr = np.interp(grid, false_positive, true_positive)
        precision, recall, _ = precision_recall_curve(is_anomaly, score)
        order = np.argsort(recall)
        best = np.maximum.accumulate(precision[order][::-1])[::-1]
        interpolated = [float(best[np.searchsorted(recall[order], r)]) if r <= recall.max() else 0.0 for r in grid]
        for row, value in zip(roc_rows, tpr):
            row.append(round(float(value), 6))
        for row, value in zip(pr_rows, interpolated):
            row.append(round(value, 6))
    return roc_rows, pr_rows


def evaluate(params: dict[str, dict[str, Any]]) -> str:
    """Run the evaluate stage with validated parameters; return its summary line."""
    settings = params["evaluate"]
    if params["spectra"]["kind"] != "fft_magnitude":
        if params["spectra"]["max_frequency_hz"] > params["spectra"]["sample_rate"] / 2:
            raise PipelineError(
                "spectra.max_frequency_hz is above half of spectra.sample_rate; lower it"
            )
    audio = params["spectra"]
    rows = read_csv(RECORDINGS_PATH)
    limit = params["compute"]["max_fit_recordings"]
    if len(rows) > limit:
        generator = np.random.default_rng(settings["random_state"])
        chosen = np.sort(generator.choice(len(rows), size=limit, replace=False))
        log.info(
            "evaluate: measuring on a seeded sample of %d of the %d recordings "
            "(compute.max_fit_recordings)",
            limit,
            len(rows),
        )
        rows = [rows[index] for index in chosen]
    labels = assign_defects(
        len(rows), settings["fraction"], settings["defects"], settings["random_state"]
    )
    corrupted_count = sum(label != CLEAN for label in labels)
    log.info(
        "evaluate: %d recordings, %d corrupted with %d defect types",
        len(rows),
        corrupted_count,
        len(settings["defects"]),
    )
    if corrupted_count > 2 * settings["fraction"] * len(rows):
        log.warning(
            "evaluate: %d of the %d recordings are corrupted (%.0f%%, evaluate.fraction "
            "is %g) because each defect type needs one, and %d of them are clean; the "
            "measures say little about a set this small",
            corrupted_count,
            len(rows),
            100 * corrupted_count / len(rows),
            settings["fraction"],
            len(rows) - corrupted_count,
        )
    corrupted = corrupt(
        [RAW_DIR / row["path"] for row in rows], [row["speaker"] for row in rows], labels, settings
    )
    columns = feature_layout(audio, window_length(audio["sample_rate"], audio["duration"]))
    spectra = []
    progress = tqdm(corrupted, total=len(rows), desc="spectra", unit="file", disable=None)
    # One BLAS thread: a second one mostly waits on the small matrix products
    # of the band pooling, as in the spectra stage.
    with threadpool_limits(limits=1, user_api="blas"):
        for recording in progress:
            samples = preprocess(
                recording, audio["sample_rate"], audio["duration"], audio["smoothing_window"]
            )
            try:
                features, _ = compute_features(samples, audio)
            except AudioInputError:
                # A defect can silence a recording completely; its features are then
                # the lowest value, which the detectors can still score.
                features = np.full(
                    columns.n_features,
                    audio["floor_db"] if audio["kind"] != "fft_magnitude" else 0.0,
                )
            spectra.append(features.astype(np.float32))
    matrix = np.vstack(spectra)
    del spectra
    detection = detect_anomalies(
        matrix, **params["detect"], layout=columns, max_fit_recordings=limit
    )
    scores = {
        "isolation_forest": detection.isolation_forest_score,
        "reconstruction_error": detection.reconstruction_error,
    }
    scores["combined"] = rank_average(*scores.values())
    quality = evaluate_scores(labels, scores)
    is_anomaly = np.array(labels) != CLEAN
    types = type_recovery(detection.errors, labels, params["cluster"], limit)
    types["flagged_only"] = flagged_type_recovery(
        detection.errors, labels, scores["combined"], params["cluster"], columns.frequencies
    )
    roc_rows, pr_rows = sampled_curves(is_anomaly, scores)

    write_csv(
        SCORES_PATH,
        ("recording_id", "defect", "set", *DETECTORS),
        (
            (
                row["recording_id"],
                labels[index],
                "train" if detection.is_train[index] else "test",
                *(float(scores[name][index]) for name in DETECTORS),
            )
            for index, row in enumerate(rows)
        ),
    )
    write_csv(ROC_PATH, ("false_positive_rate", *DETECTORS), roc_rows)
    write_csv(PR_PATH, ("recall", *DETECTORS), pr_rows)
    write_json(
        METRICS_PATH,
        {
            "recordings": len(rows),
            "corrupted": int(is_anomaly.sum()),
            "defect_counts": {
                defect: labels.count(defect) for defect in sorted(set(labels) - {CLEAN})
            },
            "detectors": quality,
            "types": types,
        },
    )
    best = max(DETECTORS, key=lambda name: quality[name]["overall"]["roc_auc"])
    log.info(
        "evaluate: defect types in the error clusters: adjusted Rand index %.3f, purity %.3f",
        types["adjusted_rand_index"],
        types["purity"],
    )
    flagged = types["flagged_only"]
    if flagged["purity"] is not None:
        log.info(
            "evaluate: clustering only the %d most anomalous recordings (%d of them "
            "corrupted): adjusted Rand index %.3f, purity %.3f",
            flagged["flagged"],
            flagged["corrupted_among_flagged"],
            flagged["adjusted_rand_index"],
            flagged["purity"],
        )
    return (
        "ROC AUC overall: "
        + ", ".join(f"{name} {quality[name]['overall']['roc_auc']:.3f}" for name in DETECTORS)
        + f"; best {best}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the evaluate stage."""
    return run_stage(
        "evaluate",
        "Corrupt a share of the recordings with known defects and measure how well "
        "the detectors rank them above the clean ones.",
        lambda params, options: evaluate(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
