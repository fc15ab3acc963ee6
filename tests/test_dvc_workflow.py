"""The DVC workflow end to end: experiments, comparisons and a shared remote."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import PROJECT_ROOT
from project import dvc, git, locked_outputs, make_project, run
from synthetic import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]


@pytest.fixture(scope="module")
def committed(tmp_path_factory):
    """A project copy after dvc repro, with dvc.lock and metrics committed."""
    root = tmp_path_factory.mktemp("workflow")
    folder = make_project(root / "project", make_dataset(root / "source"), inspect={"top_n": 3})
    dvc(folder, "repro")
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "baseline results")
    return folder


def test_experiments_show_params_and_metrics(committed):
    dvc(committed, "exp", "run", "-S", "cluster.n_clusters=4", "-n", "four-clusters")
    dvc(committed, "exp", "run", "-S", "detect.contamination=0.2", "-n", "contamination-20")
    shown = json.loads(dvc(committed, "exp", "show", "--json").stdout)
    baseline = next(entry for entry in shown if entry["rev"] != "workspace")
    experiments = {
        experiment["name"]: experiment["revs"][0]["data"]
        for experiment in baseline["experiments"]
    }
    four = experiments["four-clusters"]
    twenty = experiments["contamination-20"]

    assert four["params"]["params.yaml"]["data"]["cluster"]["n_clusters"] == 4
    assert four["metrics"]["metrics/cluster.json"]["data"]["n_clusters"] == 4
    assert twenty["params"]["params.yaml"]["data"]["detect"]["contamination"] == 0.2
    assert twenty["metrics"]["metrics/detect.json"]["data"]["train"] == 54


def test_params_and_metrics_diff(committed):
    dvc(committed, "exp", "apply", "contamination-20")
    params = json.loads(dvc(committed, "params", "diff", "--json").stdout)
    metrics = json.loads(dvc(committed, "metrics", "diff", "--json").stdout)
    flagged = metrics["metrics/detect.json"]["flagged_reconstruction"]

    contamination = params["params.yaml"]["detect.contamination"]

    assert contamination["old"] == 0.1
    assert contamination["new"] == 0.2
    assert flagged["new"] > flagged["old"]
    assert flagged["diff"] == flagged["new"] - flagged["old"]


def test_plots_diff_shows_both_revisions(committed, tmp_path):
    dvc(committed, "plots", "diff", "HEAD", "-o", str(tmp_path / "diff"))
    page = (tmp_path / "diff" / "index.html").read_text()

    assert '"rev": "HEAD"' in page
    assert '"rev": "workspace"' in page


def file_digests(folder, paths):
    digests = {}
    for path in paths:
        target = folder / path
        files = sorted(p for p in target.rglob("*") if p.is_file()) if target.is_dir() else [target]
        for file in files:
            digests[file.relative_to(folder).as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return digests


def test_push_clone_pull_reproduces_nothing(committed, tmp_path):
    git(committed, "checkout", "-q", "--", ".")
    dvc(committed, "checkout", "--force")
    dvc(committed, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    git(committed, "add", ".dvc/config")
    git(committed, "commit", "-qm", "add the shared remote")
    dvc(committed, "push")
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(committed), str(clone)], tmp_path)
    dvc(clone, "pull")
    outputs = list(locked_outputs(committed))

    assert json.loads(dvc(clone, "status", "--json").stdout) == {}
    repro = dvc(clone, "repro").stdout
    assert "Running stage" not in repro
    assert file_digests(clone, outputs) == file_digests(committed, outputs)
    assert len(file_digests(clone, outputs)) > 20


def test_readme_recovery_after_an_invalid_value(committed):
    readme = (PROJECT_ROOT / "README.md").read_text()
    params = (committed / "params.yaml").read_bytes()

    with pytest.raises(AssertionError, match="detect.contamination"):
        dvc(committed, "exp", "run", "-S", "detect.contamination=0.6")
    # DVC removed the stage's outputs before the stage rejected the value.
    assert not (committed / "metrics/detect.json").exists()
    assert b"contamination: 0.6" in (committed / "params.yaml").read_bytes()
    # The commands the README gives, in its order.
    assert "git checkout params.yaml metrics/\ndvc checkout\n" in readme
    git(committed, "checkout", "params.yaml", "metrics/")
    dvc(committed, "checkout")

    assert (committed / "params.yaml").read_bytes() == params
    assert json.loads(dvc(committed, "status", "--json").stdout) == {}
