"""The HTML report: self-contained, and loading in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from project import dvc, make_project
from synthetic import make_dataset

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Flags that keep Chromium from contacting any server and let it run as root.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    folder = make_project(root / "project", make_dataset(root / "source"))
    dvc(folder, "repro")
    return folder / "report" / "index.html"


def test_report_is_self_contained(report):
    page = report.read_text()

    assert page.count('<audio controls') == 2 * 20
    assert page.count('src="data:audio/wav;base64,') == 2 * 20
    assert page.count('<img src="data:image/png;base64,') == 3 + 20
    assert "Evaluation on known defects" in page
    assert re.search(r'(src|href)="(https?:)?//', page) is None


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_report_loads_in_chromium(report):
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    with tempfile.TemporaryDirectory() as profile:
        screenshot = report.parent / "screenshot.png"
        subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--window-size=1200,2400",
             f"--screenshot={screenshot}", report.as_uri()],
            capture_output=True,
            timeout=120,
        )

    assert dom.returncode == 0
    assert dom.stdout.count("<audio") == 40
    assert dom.stdout.count("<img") == 23
    assert "<h1>Anomaly report</h1>" in dom.stdout
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert screenshot.stat().st_size > 50_000


# Records the page's width after loading, for --dump-dom to show.
WIDTH_PROBE = (
    "<script>window.addEventListener('load', () => document.body.setAttribute("
    "'data-scroll-width', document.documentElement.scrollWidth));</script>"
)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
@pytest.mark.parametrize("width", [1200, 800])
def test_report_fits_the_window_width(report, tmp_path, width):
    page = tmp_path / "index.html"
    page.write_text(report.read_text().replace("</body>", WIDTH_PROBE + "</body>"))
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},2400",
             "--virtual-time-budget=3000", "--dump-dom", page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )

    # Two wide tables made the page 1223 px wide in a 1200 px window.
    scroll_width = int(re.search(r'data-scroll-width="(\d+)"', dom.stdout)[1])
    assert scroll_width <= width


def test_report_describes_an_autoencoder(report, monkeypatch):
    # With the autoencoder, metrics/detect.json has no PCA keys; the report
    # raised KeyError 'pca_components'.
    import json

    from audiomnist_anomalies.report import build_report

    folder = report.parent.parent
    metrics_path = folder / "metrics" / "detect.json"
    original = metrics_path.read_text()
    metrics = json.loads(original)
    for key in ("pca_components", "pca_variance_explained"):
        metrics.pop(key)
    metrics.update(reconstruction="autoencoder", autoencoder_layers=[256, 32, 256], autoencoder_epochs=41)
    monkeypatch.chdir(folder)
    metrics_path.write_text(json.dumps(metrics))
    try:
        page = build_report()
    finally:
        metrics_path.write_text(original)

    assert "<th>autoencoder layers</th>" in page
    assert "<td>256 x 32 x 256</td>" in page
    assert "<td>41</td>" in page
    assert "<th>PCA components</th>" not in page
