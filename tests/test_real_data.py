"""End-to-end run on the 3,000 real AudioMNIST recordings of the digit six."""

from __future__ import annotations

import json

import numpy as np
import pytest

from audiomnist_anomalies.outputs import read_csv
from conftest import REAL_DATA
from project import dvc, locked_outputs, make_project

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(
        not (REAL_DATA / "audioMNIST_meta.txt").is_file(),
        reason=f"the real recordings are not at {REAL_DATA}",
    ),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    folder = make_project(tmp_path_factory.mktemp("real") / "project", REAL_DATA)
    dvc(folder, "repro")
    return folder


def test_every_recording_is_analysed(project):
    metrics = json.loads((project / "metrics/data.json").read_text())

    assert metrics["found"] == 3000
    assert metrics["used"] == 3000
    assert metrics["speakers"] == 60
    assert metrics["speakers_without_metadata"] == 0
    assert len(read_csv(project / "data/recordings.csv")) == 3000
    assert len(read_csv(project / "data/scores.csv")) == 3000
    assert len(read_csv(project / "data/clusters.csv")) == 3000
    assert np.load(project / "data/spectra.npy").shape == (3000, 32 * 48)


def test_metadata_quirks_are_cleaned(project):
    rows = {row["speaker"]: row for row in read_csv(project / "data/recordings.csv")}

    assert rows["45"]["age"] == ""
    assert rows["45"]["age_raw"] == "1234"
    assert {row["recording_room"] for row in rows.values()} >= {"vr-room"}
    assert "vr-romm" not in {row["recording_room"] for row in rows.values()}


def test_detectors_flag_contamination_share(project):
    metrics = json.loads((project / "metrics/detect.json").read_text())

    assert metrics["train"] == 2700
    assert metrics["test"] == 300
    assert 250 <= metrics["flagged_isolation_forest"] <= 350
    assert 250 <= metrics["flagged_reconstruction"] <= 350
    assert 0.5 <= metrics["pca_variance_explained"] < 0.6
    assert metrics["spearman_isolation_forest_vs_reconstruction"] > 0.3


def test_status_clean_and_rerun_identical(project):
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    before = locked_outputs(project)
    dvc(project, "repro", "--force")

    assert locked_outputs(project) == before
