"""End-to-end: dvc repro in a temporary git + DVC repository on generated data."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from audiomnist_anomalies.outputs import read_csv
from conftest import PROJECT_ROOT, default_sigint
from project import BIN, dvc, locked_outputs, make_project, run
from synthetic import make_dataset

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project copy on 60 generated recordings, after one dvc repro."""
    root = tmp_path_factory.mktemp("pipeline")
    source = make_dataset(root / "source")
    folder = make_project(root / "project", source)
    dvc(folder, "repro")
    return folder


def test_every_output_has_right_shape(project):
    # log_tf: 32 time frames x 48 bands; errors are averaged over the frames.
    assert np.load(project / "data/spectra.npy").shape == (60, 32 * 48)
    assert np.load(project / "data/frequencies.npy").shape == (48,)
    assert np.load(project / "data/errors.npy").shape == (60, 48)
    assert np.load(project / "data/embedding.npy").shape == (60, 2)
    assert len(read_csv(project / "data/recordings.csv")) == 60
    assert len(read_csv(project / "data/scores.csv")) == 60
    assert len(read_csv(project / "data/clusters.csv")) == 60
    assert len(read_csv(project / "plots/embedding.csv")) == 60
    assert len(read_csv(project / "plots/error_profiles.csv")) == 10 * 48
    for name in ("embedding.png", "error_map.png", "error_profiles.png"):
        assert (project / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for name in ("isolation_forest.joblib", "pca.joblib", "scaler.joblib", "thresholds.json"):
        assert (project / "data/models" / name).is_file()


def test_inspect_writes_figures_and_audio(project):
    index = read_csv(project / "plots/inspect/index.csv")

    assert len(index) == 10 + 10
    assert [row["name"] for row in index[:2]] == ["anomaly_01", "anomaly_02"]
    assert index[0]["reconstruction_error_rank"] == "1"
    assert index[-1]["name"] == "cluster_9"
    for row in index:
        assert (project / "plots/inspect" / row["figure"]).is_file()
        assert (project / "plots/inspect" / row["original_wav"]).read_bytes()[:4] == b"RIFF"
        assert (project / "plots/inspect" / row["reconstructed_wav"]).read_bytes()[:4] == b"RIFF"


def test_status_is_clean_after_repro(project):
    assert json.loads(dvc(project, "status", "--json").stdout) == {}


def test_metrics_show_lists_every_file(project):
    shown = json.loads(dvc(project, "metrics", "show", "--json").stdout)
    data = shown[""]["data"]

    assert data["metrics/data.json"]["data"]["used"] == 60
    assert data["metrics/detect.json"]["data"]["recordings"] == 60
    assert sum(data["metrics/cluster.json"]["data"]["sizes"].values()) == 60
    assert data["metrics/embed.json"]["data"]["method"] == "pacmap"
    assert data["metrics/evaluate.json"]["data"]["corrupted"] == 11


def test_plots_show_renders_everything(project, tmp_path):
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    page = (tmp_path / "plots" / "index.html").read_text()

    assert page.count("<img") == 3 + 20
    assert '"false_positive_rate": "0.5"' in page
    assert '"cluster": "cluster 9"' in page
    assert '"recording_id": "6_01_0"' in page


def test_parameter_change_reruns_downstream_only(project):
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("n_clusters: 10", "n_clusters: 4"))
    try:
        status = json.loads(dvc(project, "status", "--json").stdout)
        # evaluate clusters its own error profiles with the cluster settings.
        assert sorted(status) == ["cluster", "evaluate"]
        log = dvc(project, "repro").stdout
        assert "Running stage 'cluster'" in log
        assert "Running stage 'inspect'" in log
        for stage in ("fetch", "spectra", "detect", "embed"):
            assert f"Running stage '{stage}'" not in log
        assert len(read_csv(project / "plots/inspect/index.csv")) == 10 + 4
    finally:
        (project / "params.yaml").write_text(params)
        dvc(project, "repro")


def test_forced_rerun_is_byte_identical(project):
    before = locked_outputs(project)
    dvc(project, "repro", "--force")

    assert locked_outputs(project) == before
    # 20 data, plot and report outputs, 2 output folders (figures, models) and 5 metrics files.
    assert len(before) == 27
    assert "plots/embedding.png" in before
    assert "plots/inspect" in before


def test_score_matches_pipeline_and_rejects(project, tmp_path):
    junk = tmp_path / "junk.wav"
    junk.write_text("not audio")
    recording = project / "data/raw/02/6_02_1.wav"
    out = tmp_path / "new_scores.csv"
    run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", str(recording), str(junk), "--out", str(out)],
        project,
    )
    rows = read_csv(out)
    pipeline = {row["recording_id"]: row for row in read_csv(project / "data/scores.csv")}
    clusters = json.loads((project / "metrics/cluster.json").read_text())["clusters"]

    assert [row["status"] for row in rows] == ["scored", "rejected"]
    assert float(rows[0]["isolation_forest_score"]) == pytest.approx(
        float(pipeline["6_02_1"]["isolation_forest_score"]), rel=1e-9
    )
    assert float(rows[0]["reconstruction_error"]) == pytest.approx(
        float(pipeline["6_02_1"]["reconstruction_error"]), rel=1e-5
    )
    assert rows[0]["isolation_forest_anomaly"] == pipeline["6_02_1"]["isolation_forest_anomaly"]
    assert rows[0]["cluster_name"] == clusters[rows[0]["cluster"]]["name"]
    assert rows[1]["reason"] == "not a WAV file (no RIFF/WAVE header)"


def test_score_gives_every_recording_its_pipeline_scores(project, tmp_path):
    recordings = sorted((project / "data/raw").glob("*/*.wav"))
    out = tmp_path / "all_scores.csv"
    run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", *map(str, recordings), "--out", str(out)],
        project,
    )
    pipeline = {row["recording_id"]: row for row in read_csv(project / "data/scores.csv")}
    rows = {Path(row["path"]).stem: row for row in read_csv(out)}

    # Scored from unrounded float64 features, scores differed from the pipeline's
    # (the Isolation Forest score by up to 0.004 for very short recordings).
    assert set(rows) == set(pipeline)
    for name, row in rows.items():
        assert float(row["isolation_forest_score"]) == pytest.approx(
            float(pipeline[name]["isolation_forest_score"]), rel=1e-12, abs=0
        ), name
        assert float(row["reconstruction_error"]) == pytest.approx(
            float(pipeline[name]["reconstruction_error"]), rel=1e-6
        ), name


def test_score_uses_fitted_settings_not_current_params(project, tmp_path):
    changed = yaml.safe_load((project / "params.yaml").read_text())
    changed["spectra"]["smoothing_window"] = 9
    changed["spectra"]["n_bands"] = 40
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    out = tmp_path / "scores.csv"
    result = run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
         "--params", str(tmp_path / "changed.yaml"), "--out", str(out)],
        project,
    )
    pipeline = {row["recording_id"]: row for row in read_csv(project / "data/scores.csv")}

    assert "spectra.n_bands, spectra.smoothing_window" in result.stderr
    assert f"{tmp_path / 'changed.yaml'} has other spectra settings" in result.stderr
    assert float(read_csv(out)[0]["reconstruction_error"]) == pytest.approx(
        float(pipeline["6_02_1"]["reconstruction_error"]), rel=1e-5
    )


def test_score_refuses_to_overwrite_an_input(project):
    recording = project / "data/raw/02/6_02_1.wav"
    before = recording.read_bytes()
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", str(recording), "--out", str(recording)],
        cwd=project, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert "is one of the files to score" in result.stderr
    assert recording.read_bytes() == before


def test_score_out_folder_is_a_clear_error(project, tmp_path):
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
         "--out", str(tmp_path)],
        cwd=project, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert f"--out {tmp_path} is a folder; give a file name for the CSV" in result.stderr
    assert "Traceback" not in result.stderr


def test_score_out_dash_is_standard_output(project):
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
         "--out", "-"],
        cwd=project, capture_output=True, text=True, timeout=120,
    )

    # A file named "-" was written before.
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("data/raw/02/6_02_1.wav,scored,")
    assert not (project / "-").exists()


def test_score_out_writes_through_links_and_pipes(project, tmp_path):
    real = tmp_path / "real.csv"
    link = tmp_path / "link.csv"
    link.symlink_to(real)
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    received = []
    reader = threading.Thread(target=lambda: received.append(pipe.read_text()), daemon=True)
    reader.start()
    for out in (link, pipe):
        result = subprocess.run(
            [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
             "--out", str(out)],
            cwd=project, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
    reader.join(timeout=60)

    # The atomic write used to replace the link and the pipe (and /dev/null) with files.
    assert link.is_symlink()
    assert real.read_text().splitlines()[1].startswith("data/raw/02/6_02_1.wav,scored,")
    assert stat.S_ISFIFO(pipe.stat().st_mode)
    assert received[0].splitlines()[1].startswith("data/raw/02/6_02_1.wav,scored,")


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_score_interrupted_exits_cleanly(project, tmp_path, signum, status):
    out = tmp_path / "scores.csv"
    process = subprocess.Popen(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score",
         *["data/raw/02/6_02_1.wav"] * 50000, "--out", str(out)],
        cwd=project, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
    )
    # Wait for the line logged when scoring starts, after the imports.
    started = process.stderr.readline()
    assert "score: 50000 files" in started
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    stderr = started + stderr

    # Ctrl-C printed a traceback, and SIGTERM ended the process without a word.
    assert process.returncode == status, stderr
    assert "score interrupted" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_score_empty_out_is_a_usage_error(project):
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
         "--out", ""],
        cwd=project, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert "--out is empty; give a CSV file name, or - for standard output" in result.stderr
    assert "Traceback" not in result.stderr


def test_score_missing_params_file_names_it(project, tmp_path):
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "data/raw/02/6_02_1.wav",
         "--params", str(tmp_path / "other.yaml")],
        cwd=project, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 2
    assert f"parameter file not found: {tmp_path / 'other.yaml'}. Check the path." in result.stderr


def test_score_without_models_fails_clearly(tmp_path):
    (tmp_path / "params.yaml").write_text((PROJECT_ROOT / "params.yaml").read_text())
    result = subprocess.run(
        [str(BIN / "python"), "-m", "audiomnist_anomalies.score", "x.wav"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert result.returncode == 2
    assert "Run 'dvc repro'" in result.stderr
    assert "Traceback" not in result.stderr


ORIGINAL_SETTINGS = (
    "spectra.kind=fft_magnitude",
    "spectra.sample_rate=6800",
    "spectra.max_frequency_hz=3200",
    "detect.standardize=false",
    "detect.pca_components=0.99",
    "cluster.band_edges_hz=[0,120,250,500,1000,2000,3400]",
)


def test_readme_line_runs_the_original_analysis(project):
    readme = (PROJECT_ROOT / "README.md").read_text()
    for setting in ORIGINAL_SETTINGS:
        assert f"-S {setting}" in readme or f"-S '{setting}'" in readme
    arguments = [word for setting in ORIGINAL_SETTINGS for word in ("-S", setting)]
    # Metrics are not cached, so dvc checkout cannot bring them back: keep them.
    kept = ["params.yaml", "dvc.lock", *(f"metrics/{path.name}" for path in (project / "metrics").iterdir())]
    saved = {name: (project / name).read_bytes() for name in kept}
    try:
        dvc(project, "exp", "run", *arguments)
        index = read_csv(project / "plots/inspect/index.csv")
        params = yaml.safe_load((project / "params.yaml").read_text())

        assert params["spectra"]["kind"] == "fft_magnitude"
        assert params["cluster"]["band_edges_hz"] == [0, 120, 250, 500, 1000, 2000, 3400]
        assert np.load(project / "data/spectra.npy").shape == (60, 3401)
        assert np.load(project / "data/errors.npy").shape == (60, 3401)
        assert np.load(project / "data/frequencies.npy")[-1] == pytest.approx(3400.0)
        assert not (project / "data/models/scaler.joblib").exists()
        assert len(read_csv(project / "plots/error_profiles.csv")) == 10 * 3401
        assert (project / "plots/inspect" / index[0]["reconstructed_wav"]).read_bytes()[:4] == b"RIFF"
        assert json.loads((project / "metrics/detect.json").read_text())["pca_variance_explained"] >= 0.99
        assert "Anomaly report" in (project / "report/index.html").read_text()
    finally:
        for name, content in saved.items():
            (project / name).write_bytes(content)
        dvc(project, "checkout", "--force")
    assert json.loads(dvc(project, "status", "--json").stdout) == {}
