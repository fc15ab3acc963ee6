"""Parameter validation: every bad value stops the stage with the key's name."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import yaml

from audiomnist_anomalies.errors import ParameterError
from audiomnist_anomalies.params import default_params, load_params, validate_params
from conftest import PROJECT_ROOT


def committed_params_text() -> str:
    """Return params.yaml as committed, because dvc exp run -S edits the working copy."""
    result = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=PROJECT_ROOT, capture_output=True, text=True
    )
    if result.returncode == 0:
        return result.stdout
    return (PROJECT_ROOT / "params.yaml").read_text()


def test_committed_params_are_valid(tmp_path):
    (tmp_path / "params.yaml").write_text(committed_params_text())
    params = load_params(tmp_path / "params.yaml")

    assert params == validate_params(default_params())
    assert params["data"]["source"].startswith("github:soerenab/AudioMNIST@630d7dab")


@pytest.mark.parametrize(
    "section, key, value, expected",
    [
        ("detect", "contamination", 0.7, "'detect.contamination': 0.7"),
        ("detect", "contamination", 0, "(0, 0.5]"),
        ("detect", "contamination", "0.1", "(str)"),
        ("detect", "test_size", 1.0, "'detect.test_size'"),
        ("detect", "pca_components", 1.5, "'detect.pca_components'"),
        ("detect", "pca_components", 0, "'detect.pca_components'"),
        ("spectra", "sample_rate", 6800.5, "'spectra.sample_rate'"),
        ("spectra", "sample_rate", True, "'spectra.sample_rate'"),
        ("spectra", "duration", -1, "'spectra.duration'"),
        ("spectra", "smoothing_window", 0, "'spectra.smoothing_window'"),
        ("cluster", "n_clusters", 0, "'cluster.n_clusters'"),
        ("cluster", "band_edges_hz", [0, 500, 100], "'cluster.band_edges_hz'"),
        ("inspect", "rank_by", "loudness", "'inspect.rank_by'"),
        ("data", "source", "github:soerenab/AudioMNIST@main", "40-digit"),
        ("data", "digit", 10, "'data.digit'"),
        ("embed", "random_state", -1, "'embed.random_state'"),
        ("compute", "n_jobs", 0, "'compute.n_jobs'"),
        ("compute", "n_jobs", "two", "'compute.n_jobs'"),
        ("compute", "dask_scheduler", "http://127.0.0.1:8786", "'compute.dask_scheduler'"),
        ("compute", "dask_scheduler", "tcp://127.0.0.1", "'compute.dask_scheduler'"),
        ("compute", "dask_scheduler", "tcp://127.0.0.1:0", "'compute.dask_scheduler'"),
        ("compute", "dask_scheduler", "tcp://127.0.0.1:99999", "'compute.dask_scheduler'"),
        # TLS needs certificates that the setting cannot give; it crashed the client.
        ("compute", "dask_scheduler", "tls://127.0.0.1:8786", "tls:// is not supported"),
        ("compute", "max_fit_recordings", 99, "'compute.max_fit_recordings'"),
        ("compute", "max_fit_recordings", 1e4 + 0.5, "'compute.max_fit_recordings'"),
    ],
)
def test_invalid_value_names_key(section, key, value, expected):
    params = default_params()
    params[section][key] = value

    with pytest.raises(ParameterError) as error:
        validate_params(params)
    assert expected in str(error.value)
    assert "expected" in str(error.value)


def test_whole_number_float_is_read_as_integer():
    params = default_params()
    params["compute"]["max_fit_recordings"] = 1e4
    params["cluster"]["n_clusters"] = 8.0

    validated = validate_params(params)
    assert validated["compute"]["max_fit_recordings"] == 10000
    assert type(validated["compute"]["max_fit_recordings"]) is int
    assert validated["cluster"]["n_clusters"] == 8


def test_misspelled_key_suggests_correct_one():
    params = default_params()
    params["detect"]["contaminaton"] = 0.1

    with pytest.raises(ParameterError, match="Did you mean 'contamination'"):
        validate_params(params)


def test_unknown_section_is_rejected():
    params = default_params()
    params["detekt"] = {}

    with pytest.raises(ParameterError, match="unknown section 'detekt'.*'detect'"):
        validate_params(params)


def test_missing_key_gives_default():
    params = default_params()
    del params["embed"]["n_neighbors"]

    with pytest.raises(ParameterError, match="missing key 'embed.n_neighbors'.*10"):
        validate_params(params)


def test_integers_accepted_for_floats():
    params = default_params()
    params["spectra"]["duration"] = 2
    params["detect"]["pca_components"] = 20
    validated = validate_params(params)

    assert validated["spectra"]["duration"] == 2.0
    assert isinstance(validated["spectra"]["duration"], float)
    assert validated["detect"]["pca_components"] == 20
    assert isinstance(validated["detect"]["pca_components"], int)


def test_broken_yaml_is_reported(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("detect: [unclosed\n")

    with pytest.raises(ParameterError, match="not valid YAML"):
        load_params(path)


def test_yaml_tags_are_not_executed(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("data: !!python/object/apply:os.system ['echo hacked']\n")

    with pytest.raises(ParameterError, match="not valid YAML"):
        load_params(path)


def test_stage_stops_with_one_line(tmp_path):
    params = copy.deepcopy(default_params())
    params["detect"]["contamination"] = 0.9
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run(
        [sys.executable, "-m", "audiomnist_anomalies.spectra"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert "detect.contamination" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("stage", ["detect", "embed", "cluster", "inspect", "evaluate", "report"])
def test_missing_input_gives_one_line(tmp_path, stage):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(default_params()))
    result = subprocess.run(
        [sys.executable, "-m", f"audiomnist_anomalies.{stage}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert "not found" in result.stderr
    assert "dvc repro" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("key", ["low_pass_hz", "high_pass_hz"])
def test_filter_cut_off_below_lowest_nyquist(key):
    params = default_params()
    params["evaluate"][key] = 2000.0

    with pytest.raises(ParameterError, match=f"evaluate.{key}"):
        validate_params(params)
