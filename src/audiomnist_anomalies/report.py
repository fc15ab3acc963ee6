"""Stage ``report``: one self-contained HTML page of the analysis.

The page embeds every image and sound as a data URI, so it opens without
network access and can be mailed or published as one file. It shows the
most anomalous recordings with players for the original and reconstructed
sound, their scores, speaker metadata and spectrum figure; the two maps;
the cluster error profiles with each cluster's name and size; and the
evaluation table when the evaluate stage has run.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any

from .cli import exit_with, run_stage
from .errors import PipelineError
from .outputs import package_versions, read_csv, write_text

log = logging.getLogger("audiomnist_anomalies.report")

REPORT_PATH = Path("report/index.html")
INSPECT_DIR = Path("plots/inspect")
RECORDINGS_PATH = Path("data/recordings.csv")
METRICS = {
    "data": Path("metrics/data.json"),
    "detect": Path("metrics/detect.json"),
    "cluster": Path("metrics/cluster.json"),
    "evaluate": Path("metrics/evaluate.json"),
}
FIGURES = {
    "embedding": Path("plots/embedding.png"),
    "error_map": Path("plots/error_map.png"),
    "error_profiles": Path("plots/error_profiles.png"),
}
METADATA_COLUMNS = ("speaker", "age", "gender", "accent", "native_speaker", "origin", "recording_room")

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; padding: 0 1rem; max-width: 1100px; color: #222; }
h1, h2 { font-weight: 600; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.5rem; text-align: left; font-size: 0.9rem; }
th { background: #f2f2f2; } img { max-width: 100%; } .recording { border-top: 1px solid #ddd; padding: 1rem 0; }
.players { display: flex; gap: 2rem; flex-wrap: wrap; } .players figure { margin: 0; }
.note { color: #555; font-size: 0.9rem; }
"""


def data_uri(path: Path, mime: str) -> str:
    """Return the file's content as a base64 data URI."""
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def table(header: list[str], rows: list[list[Any]]) -> str:
    """Render an HTML table with escaped cells."""
    head = "".join(f"<th>{html.escape(str(cell))}</th>" for cell in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(path: Path, caption: str) -> str:
    """Embed a PNG with a caption."""
    return (
        f'<figure><img src="{data_uri(path, "image/png")}" alt="{html.escape(caption)}">'
        f"<figcaption class=\"note\">{html.escape(caption)}</figcaption></figure>"
    )


def recording_section(entry: dict[str, str], recording: dict[str, str]) -> str:
    """Render one inspected recording: scores, metadata, players and figure."""
    title = f"{entry['name'].replace('_', ' ')}: {entry['recording_id']}"
    scores = table(
        ["reconstruction error", "rank", "Isolation Forest score", "rank", "cluster"],
        [[
            f"{float(entry['reconstruction_error']):.3e}",
            entry["reconstruction_error_rank"],
            f"{float(entry['isolation_forest_score']):.4f}",
            entry["isolation_forest_rank"],
            entry["cluster"],
        ]],
    )
    metadata = table(list(METADATA_COLUMNS), [[recording.get(column, "") for column in METADATA_COLUMNS]])
    players = "".join(
        f'<figure><figcaption>{label}</figcaption><audio controls preload="metadata" '
        f'src="{data_uri(INSPECT_DIR / entry[column], "audio/wav")}"></audio></figure>'
        for label, column in (("original", "original_wav"), ("reconstructed", "reconstructed_wav"))
        if entry[column]
    )
    return (
        f'<section class="recording" id="{html.escape(entry["name"])}">'
        f"<h3>{html.escape(title)}</h3>{scores}{metadata}"
        f'<div class="players">{players}</div>'
        f"{figure(INSPECT_DIR / entry['figure'], 'spectra, difference and waveforms')}</section>"
    )


def evaluation_section(metrics: dict[str, Any]) -> str:
    """Render the detectors x defect types table of ROC AUC values."""
    detectors = metrics["detectors"]
    types = ["overall"] + sorted(metrics["defect_counts"])
    rows = [
        [detector] + [f"{detectors[detector][name]['roc_auc']:.3f}" for name in types]
        for detector in detectors
    ]
    precision = [
        [detector] + [f"{detectors[detector][name]['average_precision']:.3f}" for name in types]
        for detector in detectors
    ]
    return (
        "<h2>Evaluation on known defects</h2>"
        f"<p class=\"note\">{metrics['corrupted']} of {metrics['recordings']} recordings "
        "were corrupted with known defects; higher is better.</p>"
        "<h3>ROC AUC</h3>" + table(["detector"] + types, rows)
        + "<h3>Average precision</h3>" + table(["detector"] + types, precision)
    )


def build_report() -> str:
    """Assemble the HTML page from the pipeline outputs."""
    missing = [str(path) for path in (*FIGURES.values(), INSPECT_DIR / "index.csv") if not path.exists()]
    if missing:
        raise PipelineError(f"outputs not found: {', '.join(missing)}; run dvc repro first")
    data = json.loads(METRICS["data"].read_text())
    detect = json.loads(METRICS["detect"].read_text())
    cluster = json.loads(METRICS["cluster"].read_text())
    entries = read_csv(INSPECT_DIR / "index.csv")
    recordings = {row["recording_id"]: row for row in read_csv(RECORDINGS_PATH)}

    if detect.get("reconstruction") == "autoencoder":
        model_headers = ["autoencoder layers", "epochs"]
        model_values = [
            " x ".join(str(width) for width in detect["autoencoder_layers"]),
            detect["autoencoder_epochs"],
        ]
    else:
        model_headers = ["PCA components", "variance explained"]
        model_values = [detect["pca_components"], detect["pca_variance_explained"]]
    summary = table(
        ["recordings used", "rejected", "flagged by Isolation Forest", "flagged by reconstruction error", "flagged by both", *model_headers],
        [[data["used"], data["rejected"], detect["flagged_isolation_forest"], detect["flagged_reconstruction"], detect["flagged_both"], *model_values]],
    )
    clusters = table(
        ["cluster", "name", "size", "dominant band (Hz)", "share", "peak frequency (Hz)"],
        [
            [label, info["name"], info["size"], "-".join(f"{edge:g}" for edge in info["dominant_band_hz"]), info["dominant_band_share"], info["peak_frequency_hz"]]
            for label, info in cluster["clusters"].items()
        ],
    )
    anomalies = "".join(
        recording_section(entry, recordings.get(entry["recording_id"], {}))
        for entry in entries
        if entry["name"].startswith("anomaly_")
    )
    typical = "".join(
        recording_section(entry, recordings.get(entry["recording_id"], {}))
        for entry in entries
        if entry["name"].startswith("cluster_")
    )
    evaluation = ""
    if METRICS["evaluate"].exists():
        evaluation = evaluation_section(json.loads(METRICS["evaluate"].read_text()))
    versions = ", ".join(f"{name} {version}" for name, version in package_versions().items())
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>Anomaly report</title>"
        f"<style>{STYLE}</style></head><body>"
        "<h1>Anomaly report</h1>"
        f"{summary}"
        "<h2>Map of the spectra</h2>"
        + figure(FIGURES["embedding"], "PaCMAP map: point area is the reconstruction error, colour the Isolation Forest score")
        + "<h2>Most anomalous recordings</h2>" + anomalies
        + "<h2>Clusters of reconstruction errors</h2>"
        + f"<p class=\"note\">Silhouette {cluster['silhouette']}.</p>" + clusters
        + figure(FIGURES["error_map"], "PaCMAP map of the per-frequency reconstruction errors, coloured by k-means cluster")
        + figure(FIGURES["error_profiles"], "Mean reconstruction error per frequency of each cluster, and its ratio to the mean over all recordings")
        + "<h2>Most typical member of each cluster</h2>" + typical
        + evaluation
        + f"<p class=\"note\">Made with {html.escape(versions)}.</p>"
        "</body></html>\n"
    )


def report(params: dict[str, dict[str, Any]]) -> str:
    """Run the report stage; return its summary line."""
    log.info("report: building %s", REPORT_PATH)
    page = build_report()
    write_text(REPORT_PATH, page)
    return f"{REPORT_PATH} ({len(page) / 1e6:.1f} MB)"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the report stage."""
    return run_stage(
        "report",
        "Write report/index.html, a self-contained page with the top anomalies "
        "(with audio players), the maps, the cluster profiles and the evaluation.",
        lambda params, options: report(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
