"""Tiny data sets finish or stop clearly, and killed runs leave no partial outputs."""

from __future__ import annotations

import json
import os
import stat
import signal
import subprocess
import time

import numpy as np
import pytest

from audiomnist_anomalies.cluster import cluster
from audiomnist_anomalies.detect import detect
from audiomnist_anomalies.embed import embed
from audiomnist_anomalies.errors import PipelineError
from audiomnist_anomalies.fetch import fetch
from audiomnist_anomalies.inspect import inspect
from audiomnist_anomalies.outputs import atomic_directory, atomic_path, read_csv, write_text
from audiomnist_anomalies.params import default_params, validate_params
from audiomnist_anomalies.spectra import spectra
from conftest import PROJECT_ROOT
from project import BIN, dvc, locked_outputs, make_project
from synthetic import make_dataset

STAGES = (fetch, spectra, detect, embed, cluster, inspect)


def run_all(params) -> None:
    for stage in STAGES:
        stage(params)


@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "n_recordings, outcome",
    [
        (1, "training part"),
        (2, "training part"),
        (5, "cluster.n_clusters = 10 exceeds the 5 recordings"),
        (10, None),
        (30, None),
        (100, None),
    ],
)
def test_small_data_sets(tmp_path, monkeypatch, n_recordings, outcome):
    source = make_dataset(tmp_path / "source", speakers=1, repetitions=n_recordings, anomalies=False)
    monkeypatch.chdir(tmp_path)
    params = default_params()
    params["data"]["source"] = str(source)
    params = validate_params(params)

    if outcome is not None:
        with pytest.raises(PipelineError, match=outcome):
            run_all(params)
        return
    run_all(params)
    assert len(read_csv(tmp_path / "data/clusters.csv")) == n_recordings
    assert np.all(np.isfinite(np.load(tmp_path / "data/embedding.npy")))
    method = json.loads((tmp_path / "metrics/embed.json").read_text())["method"]
    assert method == ("pca" if n_recordings < 20 else "pacmap")


@pytest.mark.timeout(600)
def test_inspect_workers_started_in_another_folder(tmp_path, monkeypatch):
    from joblib import Parallel, delayed

    # Start the reusable worker processes (unless an earlier test did) while
    # another folder is current; they keep that folder.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    folders = Parallel(n_jobs=2)(delayed(os.getcwd)() for _ in range(4))
    assert str(tmp_path / "project") not in folders

    source = make_dataset(tmp_path / "source", speakers=2, repetitions=15, anomalies=False)
    (tmp_path / "project").mkdir()
    monkeypatch.chdir(tmp_path / "project")
    params = default_params()
    params["data"]["source"] = str(source)
    run_all(validate_params(params))
    index = read_csv(tmp_path / "project/plots/inspect/index.csv")

    assert len(index) >= 8
    for row in index:
        assert (tmp_path / "project/plots/inspect" / row["figure"]).stat().st_size > 0
    assert not (tmp_path / "elsewhere" / "plots").exists()


def test_stale_temporaries_are_removed(tmp_path):
    target = tmp_path / "scores.csv"
    (tmp_path / ".scores.csv.abc123.tmp").write_text("half")
    (tmp_path / ".scores.csv.folder").mkdir()
    with atomic_path(target) as temporary:
        temporary.write_text("whole")

    assert target.read_text() == "whole"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.csv"]


def test_outputs_get_ordinary_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        write_text(tmp_path / "table.csv", "a\n")
        with atomic_directory(tmp_path / "models") as folder:
            (folder / "model.json").write_text("{}")
    finally:
        os.umask(previous)

    assert stat.S_IMODE((tmp_path / "table.csv").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "models").stat().st_mode) == 0o755


def test_failed_write_leaves_target_unchanged(tmp_path):
    target = tmp_path / "scores.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text("partial")
            raise RuntimeError("killed")

    assert target.read_text() == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["scores.csv"]


def outputs_complete_or_absent(project) -> None:
    """Assert every declared output either is absent or reads back whole."""
    for name in ("spectra.npy", "frequencies.npy", "errors.npy", "embedding.npy"):
        path = project / "data" / name
        if path.exists():
            np.load(path, allow_pickle=False)
    for name in ("data/recordings.csv", "data/scores.csv", "data/clusters.csv"):
        path = project / name
        if path.exists():
            rows = read_csv(path)
            assert len(rows) == 60


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("marker", ["data/spectra.npy", "data/scores.csv", "data/embedding.npy"])
def test_killed_repro_then_rerun(tmp_path, marker):
    source = make_dataset(tmp_path / "source")
    project = make_project(tmp_path / "project", source)
    environment = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")
    process = subprocess.Popen(
        [str(BIN / "dvc"), "repro"],
        cwd=project,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 600
    while not (project / marker).exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    # A kill while DVC writes its lock file leaves the file empty, and DVC then
    # refuses to run; removing it is the recovery the README gives.
    lock = project / ".dvc/tmp/rwlock"
    if lock.exists() and not lock.read_text().strip():
        lock.unlink()

    outputs_complete_or_absent(project)
    dvc(project, "repro")
    # A killed write leaves its temporary file; the next write of that output removes it.
    leftovers = [
        path for path in project.rglob(".*.tmp") if not {".git", ".dvc"} & set(path.parts)
    ]
    assert leftovers == []
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
    assert len(read_csv(project / "data/clusters.csv")) == 60
    assert "plots/inspect" in locked_outputs(project)


# 130 after Ctrl-C; 128 + 15 after SIGTERM, as a shell reports a process it ended.
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_interrupt_removes_temporary_output(tmp_path, capfd, ctrl_c, signum, status):
    from audiomnist_anomalies.cli import run_stage

    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    target = tmp_path / "out.npy"

    def work(params, options):
        with atomic_path(target) as temporary:
            temporary.write_bytes(b"partial")
            os.kill(os.getpid(), signum)
        return "not reached"

    result = run_stage("demo", "demo stage", work, ["--params", str(tmp_path / "params.yaml")])

    assert result == status
    assert sorted(path.name for path in tmp_path.iterdir()) == ["params.yaml"]
    assert "demo interrupted; no partial outputs were kept" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_evaluate_warns_when_set_too_small(tmp_path, monkeypatch, caplog):
    from audiomnist_anomalies.evaluate import evaluate

    source = make_dataset(tmp_path / "source", speakers=2, repetitions=15, anomalies=False)
    monkeypatch.chdir(tmp_path)
    params = default_params()
    params["data"]["source"] = str(source)
    params = validate_params(params)
    fetch(params)
    spectra(params)
    with caplog.at_level("WARNING", logger="audiomnist_anomalies.evaluate"):
        evaluate(params)

    # 11 defect types need 11 of the 30 recordings: 37%, not 5%.
    assert "11 of the 30 recordings are corrupted (37%, evaluate.fraction is 0.05)" in caplog.text
    assert json.loads((tmp_path / "metrics/evaluate.json").read_text())["corrupted"] == 11
    # The flagged recordings are too few for PaCMAP; the warning used to say "cluster:".
    assert "evaluate: 11 recordings are too few for PaCMAP" in caplog.text
    assert "cluster: " not in caplog.text


def test_damaged_outputs_give_clear_errors(tmp_path):
    from audiomnist_anomalies.detect import load_models
    from audiomnist_anomalies.outputs import load_npy

    spectra_path = tmp_path / "spectra.npy"
    np.save(spectra_path, np.ones((100, 50), dtype=np.float32))
    spectra_path.write_bytes(spectra_path.read_bytes()[:5000])
    models = tmp_path / "models"
    models.mkdir()
    import joblib

    joblib.dump({"a": np.ones(1000)}, models / "isolation_forest.joblib")
    content = (models / "isolation_forest.joblib").read_bytes()
    (models / "isolation_forest.joblib").write_bytes(content[: len(content) // 2])

    # The advice names the stage that writes the file.
    with pytest.raises(
        PipelineError, match="spectra.npy is damaged .*recreate it with dvc repro --force spectra,"
    ):
        load_npy(spectra_path, mmap=True)
    with pytest.raises(PipelineError, match="isolation_forest.joblib is damaged"):
        load_models(models)


@pytest.mark.parametrize(
    "leftover", ["data/.spectra.npy.k2j4.tmp", "data/.raw.a8b1.tmp/01/6_01_0.wav", "plots/.inspect.x9.tmp"]
)
def test_git_ignores_temporaries_of_a_killed_stage(leftover):
    # A killed stage cannot remove them; `git add -A` would commit them.
    done = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", leftover], cwd=PROJECT_ROOT, timeout=60
    )

    assert done.returncode == 0


def test_temporary_folder_name_is_ignored(tmp_path):
    with atomic_directory(tmp_path / "raw") as folder:
        name = folder.name

    assert name.startswith(".raw.")
    assert name.endswith(".tmp")


def test_text_file_in_place_of_npy_is_named(tmp_path):
    from audiomnist_anomalies.outputs import load_npy

    path = tmp_path / "spectra.npy"
    path.write_text("hello\n")

    # NumPy's own message spoke of pickled object data.
    with pytest.raises(PipelineError, match=r"spectra.npy is damaged \(not a NumPy .npy file\)"):
        load_npy(path)


def test_damaged_errors_file_names_the_detect_stage(tmp_path):
    from audiomnist_anomalies.outputs import load_npy

    path = tmp_path / "errors.npy"
    np.save(path, np.ones((100, 50), dtype=np.float32))
    path.write_bytes(path.read_bytes()[:3000])

    with pytest.raises(PipelineError, match="recreate it with dvc repro --force detect,"):
        load_npy(path)
