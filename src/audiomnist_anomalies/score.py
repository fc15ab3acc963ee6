"""Score new recordings with the models that the pipeline saved.

For each WAV file this command computes the features exactly as the spectra
stage did, with the settings it kept in ``data/features.json``, and scores it with the saved Isolation Forest and PCA. The saved
thresholds set its flags. The classifier that the cluster stage trained on
its clusters assigns it a cluster from its per-frequency error profile, and
``classifier_cv_accuracy`` in ``metrics/cluster.json`` gives how often that
is right. Without the classifier file, the nearest mean profile decides. A file that cannot be read gets a row with the reason instead
of stopping the batch.

Run it from the project root after ``dvc repro``::

    python -m audiomnist_anomalies.score new/*.wav --out new_scores.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable, TextIO

import joblib
import numpy as np
from tqdm import tqdm

from .audio import read_wav
from .cli import EXIT_USER_ERROR, configure_logging, exit_with, interrupted_status, terminate
from .detect import FEATURES_PATH, load_layout, load_models
from .features import recording_features
from .errors import AudioInputError, ParameterError, PipelineError
from .outputs import format_value, read_csv, write_csv
from .params import load_params

log = logging.getLogger("audiomnist_anomalies.score")

MODELS_DIR = Path("data/models")
PROFILES_PATH = Path("plots/error_profiles.csv")
CLASSIFIER_PATH = Path("data/cluster_classifier.joblib")
CLUSTER_METRICS_PATH = Path("metrics/cluster.json")
FREQUENCIES_PATH = Path("data/frequencies.npy")
COLUMNS = (
    "path",
    "status",
    "reason",
    "isolation_forest_score",
    "reconstruction_error",
    "isolation_forest_anomaly",
    "reconstruction_anomaly",
    "both_anomaly",
    "cluster",
    "cluster_name",
)


def load_profiles(path: Path, n_frequencies: int) -> tuple[list[str], np.ndarray]:
    """Read the per-cluster mean error profiles written by the cluster stage.

    Returns
    -------
    labels : list of str
        Cluster numbers as text, in file order.
    profiles : np.ndarray [shape=(n_clusters, n_frequencies)]
    """
    rows = read_csv(path)
    labels: list[str] = []
    values: dict[str, list[float]] = {}
    for row in rows:
        label = row["cluster"].removeprefix("cluster ")
        if label not in values:
            labels.append(label)
            values[label] = []
        values[label].append(float(row["mean_error"]))
    profiles = np.array([values[label] for label in labels])
    if profiles.ndim != 2 or profiles.shape[1] != n_frequencies:
        raise PipelineError(f"{path} does not match the spectra; rerun dvc repro")
    return labels, profiles


def nearest_cluster(errors: np.ndarray, profiles: np.ndarray) -> int:
    """Return the index of the mean error profile nearest to ``errors`` (Euclidean)."""
    return int(np.argmin(np.linalg.norm(profiles - errors, axis=1)))


def fitted_settings(
    params: dict[str, dict[str, Any]], params_path: Path | str = "params.yaml"
) -> dict[str, Any]:
    """Return the ``spectra`` settings the saved models were fitted with.

    They come from ``data/features.json``. A warning names the keys where
    ``params`` differs, because the saved models fit only their own settings.
    """
    description = json.loads(FEATURES_PATH.read_text(encoding="utf-8"))
    settings = description.get("settings")
    if settings is None:
        raise PipelineError(
            f"{FEATURES_PATH} does not record the spectra settings; rerun the "
            "pipeline (dvc repro --force spectra) to refresh it"
        )
    changed = sorted(key for key, value in params["spectra"].items() if settings.get(key) != value)
    if changed:
        log.warning(
            "score: %s has other spectra settings (%s) than the saved models "
            "were fitted with; scoring with the fitted ones. Run dvc repro to refit.",
            params_path,
            ", ".join(f"spectra.{key}" for key in changed),
        )
    return settings


def score_files(
    paths: list[Path], params: dict[str, dict[str, Any]], params_path: Path | str = "params.yaml"
) -> list[dict[str, Any]]:
    """Score each file; unreadable files get ``status`` "rejected" and a reason.

    ``params_path`` names the file ``params`` came from, in messages.
    """
    models = load_models(MODELS_DIR)
    layout = load_layout()
    frequencies = layout.frequencies
    labels, profiles = load_profiles(PROFILES_PATH, frequencies.shape[0])
    names = {
        label: cluster["name"]
        for label, cluster in json.loads(CLUSTER_METRICS_PATH.read_text())["clusters"].items()
    }
    classifier = joblib.load(CLASSIFIER_PATH) if CLASSIFIER_PATH.exists() else None
    settings = fitted_settings(params, params_path)
    rows = []
    for path in tqdm(paths, desc="score", unit="file", disable=None):
        row: dict[str, Any] = {column: None for column in COLUMNS}
        row["path"] = str(path)
        try:
            features, _ = recording_features(read_wav(path), settings)
        except AudioInputError as error:
            row.update(status="rejected", reason=str(error))
            log.warning("score: rejected %s: %s", path, error)
            rows.append(row)
            continue
        # The spectra stage stores features as float32. Rounding them the same
        # way gives a recording of the pipeline its scores in data/scores.csv,
        # the reconstruction error to within rounding (about 1e-16).
        features = features.astype(np.float32).astype(np.float64)
        forest_scores, feature_errors = models.score(features[np.newaxis, :])
        forest_score = float(forest_scores[0])
        error = float(feature_errors.mean())
        errors = layout.per_frequency(feature_errors)[0]
        if classifier is not None:
            label = str(int(classifier.predict(errors[np.newaxis, :].astype(np.float64))[0]))
        else:
            label = labels[nearest_cluster(errors, profiles)]
        forest_flag = forest_score > models.thresholds["isolation_forest"]
        pca_flag = error > models.thresholds["reconstruction_error"]
        row.update(
            status="scored",
            reason="",
            isolation_forest_score=forest_score,
            reconstruction_error=error,
            isolation_forest_anomaly=forest_flag,
            reconstruction_anomaly=pca_flag,
            both_anomaly=forest_flag and pca_flag,
            cluster=label,
            cluster_name=names.get(label, ""),
        )
        rows.append(row)
    return rows


def write_rows(handle: TextIO, cells: Iterable[list[Any]]) -> None:
    """Write the header and the rows of cells to an open text file as CSV."""
    writer = csv.writer(handle, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in cells:
        writer.writerow([format_value(value) for value in row])


def make_parser() -> argparse.ArgumentParser:
    """Build the command-line parser."""
    parser = argparse.ArgumentParser(
        prog="python -m audiomnist_anomalies.score",
        description=(
            "Score WAV files with the models saved by 'dvc repro' (run from the "
            "project root). Prints one CSV row per file: Isolation Forest anomaly "
            "score (dimensionless, higher is more anomalous), PCA reconstruction "
            "error (mean squared error of the features, standardized when "
            "detect.standardize is on), both anomaly flags, and the error-profile "
            "cluster with its name. The features are computed with the spectra "
            "settings the models were fitted with."
        ),
    )
    parser.add_argument("files", nargs="+", type=Path, metavar="FILE", help="WAV files to score")
    parser.add_argument(
        "--out",
        metavar="CSV",
        help="write the rows to this CSV file instead of standard output ('-')",
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        metavar="FILE",
        help="parameter file to check: a warning names any spectra setting that "
        "differs from the ones the models were fitted with (default: params.yaml)",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show debug logs and tracebacks"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Returns 0, 2 for a user error such as missing models, 130 when interrupted
    by Ctrl-C and 143 when stopped by SIGTERM.
    """
    parser = make_parser()
    options = parser.parse_args(argv)
    if options.out == "":
        parser.error("--out is empty; give a CSV file name, or - for standard output")
    options.out = None if options.out in (None, "-") else Path(options.out)
    configure_logging(options.debug)
    started = time.perf_counter()
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        return _score_command(options, started)
    except KeyboardInterrupt as interrupt:
        log.error("score interrupted")
        return interrupted_status(interrupt)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _score_command(options: argparse.Namespace, started: float) -> int:
    """Score the files named in ``options`` and write the rows; return the exit status."""
    try:
        params = load_params(options.params)
        missing = [
            str(path)
            for path in (MODELS_DIR, PROFILES_PATH, CLUSTER_METRICS_PATH, FREQUENCIES_PATH, FEATURES_PATH)
            if not path.exists()
        ]
        if missing:
            raise ParameterError(
                f"pipeline outputs not found: {', '.join(missing)}. Run 'dvc repro' "
                "(or 'dvc pull') in the project root first."
            )
        inputs = {path.resolve() for path in options.files}
        if options.out is not None and options.out.resolve() in inputs:
            raise ParameterError(
                f"--out {options.out} is one of the files to score; choose another "
                "file name for the CSV"
            )
        if options.out is not None and options.out.is_dir():
            raise ParameterError(
                f"--out {options.out} is a folder; give a file name for the CSV, "
                f"for example {options.out / 'scores.csv'}"
            )
        log.info("score: %d files", len(options.files))
        rows = score_files(options.files, params, options.params)
    except PipelineError as error:
        if options.debug:
            log.exception("score failed")
        else:
            log.error("score failed: %s", error)
        return EXIT_USER_ERROR
    cells = ([row[column] for column in COLUMNS] for row in rows)
    if options.out is None:
        write_rows(sys.stdout, cells)
    elif options.out.exists() and not options.out.is_file():
        # A device or a pipe, such as /dev/null: write into it. The atomic
        # write would replace it with a regular file.
        with open(options.out, "w", encoding="utf-8", newline="") as handle:
            write_rows(handle, cells)
    else:
        # Through a symbolic link to the file it names, which stays a link.
        write_csv(options.out.resolve(), COLUMNS, cells)
    scored = sum(row["status"] == "scored" for row in rows)
    log.info(
        "score done in %.1f s: %d scored, %d rejected%s",
        time.perf_counter() - started,
        scored,
        len(rows) - scored,
        f", written to {options.out}" if options.out else "",
    )
    return 0


if __name__ == "__main__":
    exit_with(main())
