"""Stage ``detect``: score every spectrum with two anomaly detectors.

Both detectors are fitted on a training part of the recordings and score
every recording, so the held-out part shows how the scores behave on
recordings the models did not see.

- Isolation Forest: the anomaly score is the negated
  ``IsolationForest.score_samples``, so a higher score is more anomalous.
- PCA reconstruction error: the spectra are projected on the principal
  components that keep ``detect.pca_components`` of the variance (or that
  many components) and mapped back. The per-frequency error is the squared
  difference, and the reconstruction error is its mean over frequencies.

Each detector flags the recordings above the ``1 - contamination``
quantile of its training scores.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from scipy.stats import rankdata, spearmanr
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPRegressor
from sklearn.preprocessing import StandardScaler

from .cli import exit_with, run_stage
from .errors import PipelineError
from .features import Layout, load_layout  # noqa: F401  load_layout for the score command
from .linear import RECONSTRUCTION_FILE, LinearReconstruction
from .outputs import (
    RowWriter,
    atomic_directory,
    load_npy,
    row_batches,
    take_rows,
    package_versions,
    read_csv,
    write_csv,
    write_json,
    write_npy,
)

log = logging.getLogger("audiomnist_anomalies.detect")

SPECTRA_PATH = Path("data/spectra.npy")
FEATURES_PATH = Path("data/features.json")
FREQUENCIES_PATH = Path("data/frequencies.npy")
RECORDINGS_PATH = Path("data/recordings.csv")
SCORES_PATH = Path("data/scores.csv")
ERRORS_PATH = Path("data/errors.npy")
MODELS_DIR = Path("data/models")
METRICS_PATH = Path("metrics/detect.json")
MIN_TRAINING_RECORDINGS = 2
# Recordings scored at a time: 4,096 spectra of 3,401 frequencies take 110 MB
# as float64, so scoring memory does not grow with the data set.
BATCH_ROWS = 4096

SCORE_COLUMNS = (
    "recording_id",
    "set",
    "isolation_forest_score",
    "reconstruction_error",
    "isolation_forest_rank",
    "reconstruction_error_rank",
    "isolation_forest_anomaly",
    "reconstruction_anomaly",
    "both_anomaly",
)


@dataclass
class Models:
    """The fitted detectors, with the feature scaling they were fitted on.

    Attributes
    ----------
    isolation_forest : IsolationForest
    pca : PCA
    scaler : StandardScaler or None
        Applied to features before both detectors when ``detect.standardize``.
    thresholds : dict
        ``isolation_forest`` and ``reconstruction_error`` flag thresholds.
    """

    isolation_forest: IsolationForest
    pca: PCA | MLPRegressor
    scaler: StandardScaler | None
    thresholds: dict[str, float]

    def scaled(self, features: np.ndarray) -> np.ndarray:
        """Return features in the space the detectors were fitted in."""
        features = np.asarray(features, dtype=np.float64)
        return self.scaler.transform(features) if self.scaler is not None else features

    def reconstruct(self, features: np.ndarray) -> np.ndarray:
        """Return the PCA reconstruction of features, in feature units."""
        reconstructed = reconstruct(self.pca, self.scaled(features))
        if self.scaler is not None:
            reconstructed = self.scaler.inverse_transform(reconstructed)
        return reconstructed

    def score(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Return the Isolation Forest score and the squared error of every feature."""
        scaled = self.scaled(features)
        forest_score = -self.isolation_forest.score_samples(scaled)
        return forest_score, (scaled - reconstruct(self.pca, scaled)) ** 2


@dataclass
class Detection:
    """Scores, flags and fitted models of the detect stage.

    Attributes
    ----------
    is_train : np.ndarray [shape=(n,), dtype=bool]
        True for recordings in the training part.
    isolation_forest_score, reconstruction_error : np.ndarray [shape=(n,)]
        Anomaly scores; higher is more anomalous.
    errors : np.ndarray [shape=(n, n_frequencies), dtype=float32]
        Squared PCA reconstruction error per frequency, averaged over time
        frames for features that have them.
    isolation_forest_threshold, reconstruction_threshold : float
        Scores above these are flagged.
    isolation_forest : IsolationForest
    pca : PCA
    scaler : StandardScaler or None
    """

    is_train: np.ndarray
    isolation_forest_score: np.ndarray
    reconstruction_error: np.ndarray
    errors: np.ndarray
    isolation_forest_threshold: float
    reconstruction_threshold: float
    isolation_forest: IsolationForest
    pca: PCA | MLPRegressor
    scaler: StandardScaler | None = None

    @property
    def models(self) -> Models:
        """The fitted detectors and thresholds, as saved for reuse."""
        return Models(
            self.isolation_forest,
            self.pca,
            self.scaler,
            {
                "isolation_forest": self.isolation_forest_threshold,
                "reconstruction_error": self.reconstruction_threshold,
            },
        )

    @property
    def isolation_forest_anomaly(self) -> np.ndarray:
        """Recordings flagged by the Isolation Forest."""
        return self.isolation_forest_score > self.isolation_forest_threshold

    @property
    def reconstruction_anomaly(self) -> np.ndarray:
        """Recordings flagged by the PCA reconstruction error."""
        return self.reconstruction_error > self.reconstruction_threshold


def split_training(
    n_recordings: int, test_size: float, random_state: int
) -> np.ndarray:
    """Return a boolean mask of the training part of a shuffled split.

    ``test_size`` 0 puts every recording in the training part.
    """
    is_train = np.ones(n_recordings, dtype=bool)
    if test_size > 0:
        _, test_index = train_test_split(
            np.arange(n_recordings), test_size=test_size, random_state=random_state
        )
        is_train[test_index] = False
    return is_train


def reconstruct(model: PCA | MLPRegressor, spectra: np.ndarray) -> np.ndarray:
    """Reconstruct features with a fitted PCA (project and map back) or autoencoder."""
    if isinstance(model, MLPRegressor):
        return model.predict(spectra)
    return model.inverse_transform(model.transform(spectra))


def fit_autoencoder(
    train: np.ndarray, layers: list[int], max_epochs: int, random_state: int
) -> MLPRegressor:
    """Fit a dense autoencoder (an MLP trained to output its input) on the CPU.

    Training stops early when the loss on a held-back tenth of ``train``
    stops improving for 10 epochs.
    """
    model = MLPRegressor(
        hidden_layer_sizes=tuple(layers),
        activation="relu",
        alpha=1e-4,
        max_iter=max_epochs,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        random_state=random_state,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(train, train)


def detect_anomalies(
    spectra: np.ndarray,
    *,
    test_size: float,
    random_state: int,
    contamination: float,
    pca_components: float | int,
    n_estimators: int,
    standardize: bool = False,
    reconstruction: str = "pca",
    autoencoder_layers: list[int] = (256, 32, 256),
    autoencoder_epochs: int = 200,
    layout: Layout | None = None,
    max_fit_recordings: int = 10_000,
    errors_path: Path | None = None,
) -> Detection:
    """Fit both detectors on the training part and score every recording.

    Parameters
    ----------
    spectra : np.ndarray [shape=(n, n_frequencies)]
        Normalized magnitude spectra; a memory map is read in batches.
    test_size : float in [0, 0.9]
        Fraction of recordings held out from fitting.
    random_state : int
        Seed of the split and the Isolation Forest.
    contamination : float in (0, 0.5]
        Expected fraction of anomalies; sets both flag thresholds.
    pca_components : float in (0, 1) or int >= 1
        Fraction of variance to keep, or number of components.
    n_estimators : int
        Number of Isolation Forest trees.
    standardize : bool
        Scale each feature to zero mean and unit variance over the training
        part before fitting.
    reconstruction : {"pca", "autoencoder"}
        Model whose reconstruction error is the second score.
    autoencoder_layers : list of int
        Hidden layer widths of the autoencoder, for example [256, 32, 256].
    autoencoder_epochs : int
        Maximum training epochs of the autoencoder.
    layout : Layout, optional
        Column layout of the features; errors of features with time frames
        are averaged over the frames. Without it every column is a frequency.
    max_fit_recordings : int
        Fit on a seeded sample of this many training recordings when there
        are more; every recording is scored, in batches.
    errors_path : Path, optional
        Stream the per-frequency errors into this ``.npy`` file instead of
        keeping them in memory; ``Detection.errors`` is then a memory map.

    Returns
    -------
    Detection

    Raises
    ------
    PipelineError
        If the training part is too small for the requested models.
    """
    n_recordings, n_frequencies = spectra.shape
    # train_test_split rounds the held-out count up.
    n_train = n_recordings - math.ceil(test_size * n_recordings)
    if n_train < MIN_TRAINING_RECORDINGS:
        hint = "Add recordings"
        if n_recordings >= MIN_TRAINING_RECORDINGS:
            hint += " or lower detect.test_size"
        raise PipelineError(
            f"only {n_train} recordings in the training part (of {n_recordings}); "
            f"at least {MIN_TRAINING_RECORDINGS} are needed. {hint}."
        )
    if reconstruction == "autoencoder" and not standardize:
        # Unscaled spectra are mostly near zero, and the network's loss then
        # stops improving after a few epochs without learning the spectra.
        raise PipelineError(
            "detect.reconstruction: autoencoder needs detect.standardize: true; run "
            "for example dvc exp run -S detect.reconstruction=autoencoder "
            "-S detect.standardize=true"
        )
    is_train = split_training(n_recordings, test_size, random_state)
    if isinstance(pca_components, int) and pca_components > min(n_train, n_frequencies):
        raise PipelineError(
            f"detect.pca_components = {pca_components} exceeds the "
            f"{min(n_train, n_frequencies)} components that {n_train} training "
            f"recordings of {n_frequencies} frequencies allow; lower it or give a "
            "variance fraction such as 0.99."
        )
    fit_index = fit_sample(is_train, max_fit_recordings, random_state)
    if fit_index.shape[0] < is_train.sum():
        log.info(
            "detect: fitting on a sample of %d of the %d training recordings "
            "(compute.max_fit_recordings)",
            fit_index.shape[0],
            int(is_train.sum()),
        )
    train = take_rows(spectra, fit_index).astype(np.float64)
    scaler = None
    if standardize:
        scaler = StandardScaler().fit(train)
        train = scaler.transform(train)

    forest = IsolationForest(
        n_estimators=n_estimators,
        contamination=contamination,
        random_state=random_state,
    ).fit(train)
    # score_samples is offset_ away from decision_function, so this matches predict().
    forest_threshold = float(-forest.offset_)

    if reconstruction == "autoencoder":
        model = fit_autoencoder(train, autoencoder_layers, autoencoder_epochs, random_state)
    else:
        model = fit_pca(train, pca_components)
        if model.n_components_ >= fit_index.shape[0] - 1:
            log.warning(
                "detect: %d PCA components for %d training recordings reconstruct the "
                "training part almost exactly, so reconstruction errors and flags carry "
                "little meaning; add recordings or lower detect.pca_components",
                model.n_components_,
                fit_index.shape[0],
            )
    del train
    models = Models(forest, model, scaler, {})
    forest_score = np.empty(n_recordings)
    reconstruction_error = np.empty(n_recordings)
    n_columns = layout.frequencies.shape[0] if layout is not None else n_frequencies
    with RowWriter(errors_path, n_columns) as writer:
        for start, rows in row_batches(spectra, BATCH_ROWS):
            stop = start + rows.shape[0]
            forest_score[start:stop], errors = models.score(rows)
            reconstruction_error[start:stop] = errors.mean(axis=1)
            writer.append(layout.per_frequency(errors) if layout is not None else errors)
        per_frequency = writer.finish()
    # NOTE: a reconstruction model fits its own training recordings more closely
    # than held-out ones, so a threshold from training errors flags held-out
    # recordings more often (PCA: 14% against 10% on the 3,000 real recordings
    # of the digit six).
    reconstruction_threshold = float(
        np.quantile(reconstruction_error[is_train], 1.0 - contamination)
    )
    return Detection(
        is_train=is_train,
        isolation_forest_score=forest_score,
        reconstruction_error=reconstruction_error,
        errors=per_frequency,
        isolation_forest_threshold=forest_threshold,
        reconstruction_threshold=reconstruction_threshold,
        isolation_forest=forest,
        pca=model,
        scaler=scaler,
    )


def fit_sample(is_train: np.ndarray, max_fit: int, random_state: int) -> np.ndarray:
    """Return the sorted indices of the training recordings the models are fitted on.

    All of them up to ``max_fit``; above it a seeded sample of ``max_fit``.
    """
    train_index = np.flatnonzero(is_train)
    if train_index.shape[0] <= max_fit:
        return train_index
    generator = np.random.default_rng(random_state)
    return np.sort(generator.choice(train_index, size=max_fit, replace=False))


def fit_pca(train: np.ndarray, n_components: float | int) -> PCA:
    """Fit a PCA through the eigendecomposition of the smaller Gram matrix.

    The result is a fitted scikit-learn ``PCA``, equal to ``svd_solver="full"``
    up to rounding. The eigenproblem of the centred data times its own
    transpose (n x n, or d x d when there are more rows than columns) is
    solved faster than the singular value decomposition of the data: 1.6 s
    instead of 5.7 s for 2,700 spectra of 3,401 frequencies. Signs follow
    scikit-learn's convention: the largest loading of each component is
    positive.

    Parameters
    ----------
    train : np.ndarray [shape=(n, d), dtype=float64]
    n_components : float in (0, 1) or int >= 1
        Share of variance to keep (the fewest components that exceed it), or
        a number of components.
    """
    n_samples, n_features = train.shape
    mean = train.mean(axis=0)
    centred = train - mean
    if n_samples <= n_features:
        eigenvalues, vectors = np.linalg.eigh(centred @ centred.T)
    else:
        eigenvalues, vectors = np.linalg.eigh(centred.T @ centred)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues = np.clip(eigenvalues[order], 0.0, None)
    vectors = vectors[:, order]
    variance = eigenvalues / max(n_samples - 1, 1)
    total = variance.sum()
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    rank = min(n_samples, n_features)
    if isinstance(n_components, float) and n_components < 1:
        count = int(np.searchsorted(np.cumsum(ratio), n_components, side="right")) + 1
        count = min(count, rank)
    else:
        count = int(n_components)
    singular = np.sqrt(eigenvalues[:count])
    if n_samples <= n_features:
        with np.errstate(divide="ignore", invalid="ignore"):
            components = (centred.T @ vectors[:, :count] / singular).T
        components[~np.isfinite(components)] = 0.0
    else:
        components = vectors[:, :count].T.copy()
    largest = np.argmax(np.abs(components), axis=1)
    signs = np.sign(components[np.arange(count), largest])
    signs[signs == 0] = 1.0
    components *= signs[:, None]

    pca = PCA(n_components=n_components, svd_solver="full")
    pca.n_features_in_ = n_features
    pca.n_samples_ = n_samples
    pca.mean_ = mean
    pca.components_ = components
    pca.n_components_ = count
    pca.explained_variance_ = variance[:count]
    pca.explained_variance_ratio_ = ratio[:count]
    pca.singular_values_ = singular
    pca.noise_variance_ = float(variance[count:rank].mean()) if count < rank else 0.0
    return pca


def anomaly_rank(scores: np.ndarray) -> np.ndarray:
    """Rank scores so that 1 is the most anomalous; ties share the lowest rank."""
    return rankdata(-scores, method="min").astype(int)


def detect_metrics(detection: Detection) -> dict[str, Any]:
    """Summarize counts, flags, agreement of the detectors and the PCA model."""
    forest_flag = detection.isolation_forest_anomaly
    pca_flag = detection.reconstruction_anomaly
    test = ~detection.is_train
    n = detection.is_train.shape[0]
    correlation = float("nan")
    if n > 2:
        correlation = float(
            spearmanr(detection.isolation_forest_score, detection.reconstruction_error)[0]
        )
    return {
        "recordings": n,
        "train": int(detection.is_train.sum()),
        "test": int(test.sum()),
        "flagged_isolation_forest": int(forest_flag.sum()),
        "flagged_reconstruction": int(pca_flag.sum()),
        "flagged_both": int((forest_flag & pca_flag).sum()),
        "flagged_isolation_forest_test": int((forest_flag & test).sum()),
        "flagged_reconstruction_test": int((pca_flag & test).sum()),
        "spearman_isolation_forest_vs_reconstruction": (
            round(correlation, 6) if np.isfinite(correlation) else None
        ),
        **reconstruction_metrics(detection.pca, detection.scaler is not None),
        "isolation_forest_threshold": round(detection.isolation_forest_threshold, 6),
        "reconstruction_threshold": detection.reconstruction_threshold,
    }


def reconstruction_metrics(model: PCA | MLPRegressor, standardized: bool) -> dict[str, Any]:
    """Describe the fitted reconstruction model for ``metrics/detect.json``."""
    if isinstance(model, MLPRegressor):
        return {
            "reconstruction": "autoencoder",
            "standardized": standardized,
            "autoencoder_layers": list(model.hidden_layer_sizes),
            "autoencoder_epochs": int(model.n_iter_),
            "autoencoder_validation_score": round(float(model.best_validation_score_), 6),
        }
    return {
        "reconstruction": "pca",
        "standardized": standardized,
        "pca_components": int(model.n_components_),
        "pca_variance_explained": round(float(model.explained_variance_ratio_.sum()), 6),
    }


def write_outputs(detection: Detection, recording_ids: list[str]) -> None:
    """Write scores, error matrix, models and metrics atomically."""
    forest_rank = anomaly_rank(detection.isolation_forest_score)
    pca_rank = anomaly_rank(detection.reconstruction_error)
    forest_flag = detection.isolation_forest_anomaly
    pca_flag = detection.reconstruction_anomaly
    rows = (
        (
            recording_id,
            "train" if detection.is_train[i] else "test",
            float(detection.isolation_forest_score[i]),
            float(detection.reconstruction_error[i]),
            int(forest_rank[i]),
            int(pca_rank[i]),
            bool(forest_flag[i]),
            bool(pca_flag[i]),
            bool(forest_flag[i] and pca_flag[i]),
        )
        for i, recording_id in enumerate(recording_ids)
    )
    write_csv(SCORES_PATH, SCORE_COLUMNS, rows)
    if not isinstance(detection.errors, np.memmap):
        write_npy(ERRORS_PATH, detection.errors)
    with atomic_directory(MODELS_DIR) as folder:
        joblib.dump(detection.isolation_forest, folder / "isolation_forest.joblib")
        joblib.dump(detection.pca, folder / "pca.joblib")
        if detection.scaler is not None:
            joblib.dump(detection.scaler, folder / "scaler.joblib")
        if isinstance(detection.pca, PCA):
            linear = linear_reconstruction(detection.pca, detection.scaler)
            write_npy(folder / RECONSTRUCTION_FILE, linear.to_array())
        write_json(
            folder / "thresholds.json",
            {
                "isolation_forest": detection.isolation_forest_threshold,
                "reconstruction_error": detection.reconstruction_threshold,
            },
        )
        # joblib files load reliably only with the versions that wrote them.
        write_json(folder / "versions.json", package_versions())
    write_json(METRICS_PATH, detect_metrics(detection))


def linear_reconstruction(pca: PCA, scaler: StandardScaler | None) -> LinearReconstruction:
    """Return the scaling and PCA reconstruction as plain arrays."""
    n_features = pca.mean_.shape[0]
    return LinearReconstruction(
        scaler.mean_ if scaler is not None else np.zeros(n_features),
        scaler.scale_ if scaler is not None else np.ones(n_features),
        pca.mean_,
        pca.components_,
    )


def load_models(models_dir: Path = MODELS_DIR, forest: bool = True) -> Models:
    """Load the models that this pipeline's detect stage saved.

    Only load files that the pipeline wrote itself: joblib files are pickles
    and can run code when loaded. Without ``forest`` the Isolation Forest is
    not loaded and is None.
    """
    import json

    def load(path: Path) -> Any:
        try:
            if path.suffix == ".json":
                return json.loads(path.read_text(encoding="utf-8"))
            return joblib.load(path)
        except FileNotFoundError:
            raise
        except Exception as error:  # a cut-short pickle raises many kinds of error
            raise PipelineError(
                f"{path} is damaged ({type(error).__name__}: {error}); recreate it with "
                "dvc repro --force detect, or restore it with dvc checkout"
            ) from None

    forest = load(models_dir / "isolation_forest.joblib") if forest else None
    pca = load(models_dir / "pca.joblib")
    scaler_path = models_dir / "scaler.joblib"
    scaler = load(scaler_path) if scaler_path.exists() else None
    thresholds = load(models_dir / "thresholds.json")
    return Models(forest, pca, scaler, thresholds)


def detect(params: dict[str, dict[str, Any]]) -> str:
    """Run the detect stage with validated parameters; return its summary line."""
    settings = params["detect"]
    spectra = load_npy(SPECTRA_PATH, mmap=True)
    recording_ids = [row["recording_id"] for row in read_csv(RECORDINGS_PATH)]
    if len(recording_ids) != spectra.shape[0]:
        raise PipelineError(
            f"{RECORDINGS_PATH} has {len(recording_ids)} rows but {SPECTRA_PATH} has "
            f"{spectra.shape[0]}; rerun the spectra stage (dvc repro)"
        )
    log.info(
        "detect: %d spectra x %d frequencies, test size %.2f, contamination %.3f",
        spectra.shape[0],
        spectra.shape[1],
        settings["test_size"],
        settings["contamination"],
    )
    layout = load_layout()
    if layout.n_features != spectra.shape[1]:
        raise PipelineError(
            f"{FEATURES_PATH} describes {layout.n_features} columns but {SPECTRA_PATH} "
            f"has {spectra.shape[1]}; rerun the spectra stage (dvc repro)"
        )
    detection = detect_anomalies(
        spectra,
        **settings,
        layout=layout,
        max_fit_recordings=params["compute"]["max_fit_recordings"],
        errors_path=ERRORS_PATH,
    )
    write_outputs(detection, recording_ids)
    metrics = detect_metrics(detection)
    if metrics["reconstruction"] == "pca":
        model = (
            f"{metrics['pca_components']} PCA components "
            f"({metrics['pca_variance_explained']:.3f} of variance)"
        )
    else:
        model = f"autoencoder {metrics['autoencoder_layers']}, {metrics['autoencoder_epochs']} epochs"
    return (
        f"{model}; flagged "
        f"{metrics['flagged_isolation_forest']} by Isolation Forest, "
        f"{metrics['flagged_reconstruction']} by reconstruction error, "
        f"{metrics['flagged_both']} by both"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the detect stage."""
    return run_stage(
        "detect",
        "Fit Isolation Forest and PCA on a training part of the spectra and "
        "score every recording.",
        lambda params, options: detect(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
