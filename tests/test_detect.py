"""Anomaly detectors: planted defects, flags, ranks, errors and saved models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from audiomnist_anomalies.detect import (
    anomaly_rank,
    detect,
    detect_anomalies,
    detect_metrics,
    load_models,
    split_training,
)
from audiomnist_anomalies.errors import PipelineError
from audiomnist_anomalies.linear import RECONSTRUCTION_FILE, load_reconstruction
from audiomnist_anomalies.outputs import read_csv
from audiomnist_anomalies.params import default_params, validate_params
from audiomnist_anomalies.spectra import compute_spectra, spectra

SETTINGS = dict(
    test_size=0.1, random_state=42, contamination=0.1, pca_components=5, n_estimators=100
)


@pytest.fixture
def generated_spectra(dataset):
    result = compute_spectra(dataset, 6, 6800, 1.0, 5)
    ids = [row["recording_id"] for row in result.recordings]
    return result.spectra, ids


def test_noisy_recording_ranks_first(generated_spectra):
    matrix, ids = generated_spectra
    detection = detect_anomalies(matrix, **SETTINGS)
    noisy = ids.index("6_02_1")

    assert anomaly_rank(detection.isolation_forest_score)[noisy] == 1
    assert anomaly_rank(detection.reconstruction_error)[noisy] <= 3
    assert detection.isolation_forest_anomaly[noisy]
    assert detection.reconstruction_anomaly[noisy]


def test_clipped_recording_scores_above_median(generated_spectra):
    matrix, ids = generated_spectra
    detection = detect_anomalies(matrix, **SETTINGS)
    clipped = ids.index("6_04_2")

    assert detection.isolation_forest_score[clipped] > np.median(detection.isolation_forest_score)
    assert detection.reconstruction_error[clipped] > np.median(detection.reconstruction_error)


def test_split_is_seeded_and_sized():
    first = split_training(100, 0.1, 42)

    assert first.sum() == 90
    assert np.array_equal(first, split_training(100, 0.1, 42))
    assert not np.array_equal(first, split_training(100, 0.1, 7))
    assert split_training(10, 0.0, 42).all()


def test_flags_follow_contamination(generated_spectra):
    matrix, _ = generated_spectra
    detection = detect_anomalies(matrix, **dict(SETTINGS, contamination=0.2))
    train = detection.is_train

    assert detection.reconstruction_anomaly[train].mean() == pytest.approx(0.2, abs=0.03)
    assert detection.isolation_forest_anomaly[train].mean() == pytest.approx(0.2, abs=0.03)


def test_errors_are_squared_differences(generated_spectra):
    matrix, _ = generated_spectra
    detection = detect_anomalies(matrix, **SETTINGS)
    reconstructed = detection.pca.inverse_transform(detection.pca.transform(matrix.astype(float)))

    assert detection.errors.shape == matrix.shape
    assert np.allclose(detection.errors, (matrix - reconstructed) ** 2, rtol=1e-5, atol=1e-12)
    assert np.allclose(detection.reconstruction_error, detection.errors.mean(axis=1), rtol=1e-5)


def test_variance_fraction_sets_components(generated_spectra):
    matrix, _ = generated_spectra
    detection = detect_anomalies(matrix, **dict(SETTINGS, pca_components=0.9))
    metrics = detect_metrics(detection)

    assert metrics["pca_variance_explained"] >= 0.9
    assert metrics["pca_components"] == detection.pca.n_components_
    assert metrics["recordings"] == 60
    assert metrics["train"] == 54
    assert metrics["test"] == 6


def test_anomaly_rank_orders_descending():
    assert anomaly_rank(np.array([0.1, 0.9, 0.5, 0.9])).tolist() == [4, 1, 3, 1]


def test_too_few_recordings_raise():
    with pytest.raises(PipelineError, match="training part"):
        detect_anomalies(np.ones((2, 10), dtype=np.float32), **SETTINGS)


def test_too_many_components_raise(generated_spectra):
    matrix, _ = generated_spectra

    with pytest.raises(PipelineError, match="detect.pca_components = 500"):
        detect_anomalies(matrix, **dict(SETTINGS, pca_components=500))


def test_stage_outputs_and_saved_models(dataset, in_tmp):
    shutil.copytree(dataset, in_tmp / "data" / "raw")
    params = validate_params(default_params())
    spectra(params)
    detect(params)
    rows = read_csv(in_tmp / "data" / "scores.csv")
    metrics = json.loads((in_tmp / "metrics" / "detect.json").read_text())
    models = load_models(in_tmp / "data" / "models")
    matrix = np.load(in_tmp / "data" / "spectra.npy")

    assert len(rows) == 60
    assert sum(row["set"] == "test" for row in rows) == 6
    assert sorted(int(row["reconstruction_error_rank"]) for row in rows) == list(range(1, 61))
    assert metrics["flagged_both"] == sum(row["both_anomaly"] == "true" for row in rows)
    # Default features: log_tf, 32 frames x 48 bands; errors per band.
    assert matrix.shape == (60, 32 * 48)
    assert np.load(in_tmp / "data" / "errors.npy").shape == (60, 48)
    assert np.allclose(
        models.score(matrix)[0],
        [float(row["isolation_forest_score"]) for row in rows],
    )
    assert models.pca.n_components_ == metrics["pca_components"]
    assert 0.5 <= metrics["pca_variance_explained"] < 1.0
    assert models.scaler is not None
    assert models.thresholds["isolation_forest"] == pytest.approx(
        metrics["isolation_forest_threshold"], abs=1e-6
    )


def test_autoencoder_finds_noise_and_repeats(generated_spectra):
    matrix, ids = generated_spectra
    settings = dict(
        SETTINGS,
        standardize=True,
        reconstruction="autoencoder",
        autoencoder_layers=[64, 8, 64],
        autoencoder_epochs=300,
    )
    first = detect_anomalies(matrix, **settings)
    second = detect_anomalies(matrix, **settings)
    metrics = detect_metrics(first)

    assert anomaly_rank(first.reconstruction_error)[ids.index("6_02_1")] == 1
    assert np.array_equal(first.reconstruction_error, second.reconstruction_error)
    assert metrics["reconstruction"] == "autoencoder"
    assert metrics["autoencoder_layers"] == [64, 8, 64]
    assert "pca_components" not in metrics


def test_standardized_models_score_like_detection(generated_spectra):
    matrix, _ = generated_spectra
    detection = detect_anomalies(matrix, **dict(SETTINGS, standardize=True))
    forest_score, errors = detection.models.score(matrix)

    assert np.allclose(forest_score, detection.isolation_forest_score)
    assert np.allclose(errors.mean(axis=1), detection.reconstruction_error)
    rescaled = detection.scaler.transform(detection.models.reconstruct(matrix))
    assert np.allclose(
        ((detection.models.scaled(matrix) - rescaled) ** 2).mean(axis=1),
        detection.reconstruction_error,
    )


def test_autoencoder_needs_standardized_features(generated_spectra):
    matrix, _ = generated_spectra

    with pytest.raises(PipelineError, match="detect.standardize: true"):
        detect_anomalies(matrix, **dict(SETTINGS, reconstruction="autoencoder"))


@pytest.mark.parametrize("standardize", [True, False])
def test_linear_reconstruction_equals_models(dataset, in_tmp, standardize):
    shutil.copytree(dataset, in_tmp / "data" / "raw")
    params = default_params()
    params["detect"]["standardize"] = standardize
    params = validate_params(params)
    spectra(params)
    detect(params)
    models = load_models(in_tmp / "data" / "models", forest=False)
    matrix = np.load(in_tmp / "data" / "spectra.npy")
    linear = load_reconstruction(in_tmp / "data" / "models", matrix.shape[1])

    assert models.isolation_forest is None
    assert (models.scaler is not None) == standardize
    assert linear.components.shape == models.pca.components_.shape
    expected = models.reconstruct(matrix)
    assert np.max(np.abs(linear.reconstruct(matrix) - expected)) < 1e-9 * np.max(np.abs(expected))
    # The reconstruction is not the identity: it drops the minor components.
    assert np.max(np.abs(expected - matrix)) > 0.1


def test_autoencoder_keeps_no_linear_reconstruction(dataset, in_tmp):
    shutil.copytree(dataset, in_tmp / "data" / "raw")
    params = default_params()
    params["detect"].update(reconstruction="autoencoder", autoencoder_epochs=5)
    params = validate_params(params)
    spectra(params)
    detect(params)

    assert load_reconstruction(in_tmp / "data" / "models", 1536) is None


@pytest.mark.parametrize(
    "rows, reason",
    [
        (np.zeros((2, 5)), "expected at least 4 rows"),
        (np.ones((6, 4)), "4 columns, the spectra have 5"),
        (np.r_[np.ones((5, 5)), np.full((1, 5), np.nan)], "not finite"),
        (np.r_[np.ones((1, 5)), np.zeros((1, 5)), np.ones((3, 5))], "scale is not positive"),
    ],
)
def test_damaged_linear_reconstruction_names_the_file(tmp_path, rows, reason):
    # NaN rows used to pass and give silent reconstructed WAV files.
    np.save(tmp_path / RECONSTRUCTION_FILE, rows)

    with pytest.raises(PipelineError, match=f"pca_reconstruction.npy is damaged .*{reason}"):
        load_reconstruction(tmp_path, 5)


def test_inspect_imports_no_scikit_learn():
    # Importing them took about a second of every inspect run.
    code = (
        "import sys, audiomnist_anomalies.inspect\n"
        "print(sorted(m for m in ('sklearn', 'scipy', 'joblib') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert done.stdout.strip() == "[]"
