"""Stage ``embed``: a PaCMAP map of the spectra, sized and coloured by the scores.

Each point is a recording. Its area grows with the PCA reconstruction
error and its colour is the Isolation Forest anomaly score, so recordings
that both detectors find unusual stand out as large bright points.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .cli import exit_with, run_stage
from .errors import PipelineError
from .mapping import pacmap_embedding
from .outputs import load_npy, read_csv, save_figure, write_csv, write_json, write_npy

log = logging.getLogger("audiomnist_anomalies.embed")

SPECTRA_PATH = Path("data/spectra.npy")
SCORES_PATH = Path("data/scores.csv")
RECORDINGS_PATH = Path("data/recordings.csv")
EMBEDDING_PATH = Path("data/embedding.npy")
FIGURE_PATH = Path("plots/embedding.png")
TABLE_PATH = Path("plots/embedding.csv")
METRICS_PATH = Path("metrics/embed.json")

TABLE_COLUMNS = (
    "recording_id",
    "x",
    "y",
    "isolation_forest_score",
    "reconstruction_error",
    "isolation_forest_rank",
    "reconstruction_error_rank",
    "speaker",
    "set",
)


def draw_embedding(
    embedding: np.ndarray,
    isolation_forest_score: np.ndarray,
    reconstruction_error: np.ndarray,
    title: str,
):
    """Draw the scatter of the map: area is reconstruction error, colour the forest score.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from .plotting import marker_sizes, plt

    figure, axes = plt.subplots(figsize=(8, 6.5))
    order = np.argsort(reconstruction_error, kind="stable")[::-1]
    sizes = marker_sizes(reconstruction_error)
    points = axes.scatter(
        embedding[order, 0],
        embedding[order, 1],
        s=sizes[order],
        c=isolation_forest_score[order],
        cmap="viridis",
        alpha=0.75,
        linewidths=0.3,
        edgecolors="black",
    )
    colour_bar = figure.colorbar(points, ax=axes)
    colour_bar.set_label("Isolation Forest anomaly score (higher is more anomalous)")

    if reconstruction_error.size and reconstruction_error.max() > 0:
        examples = np.quantile(reconstruction_error, [0.5, 0.9, 1.0])
        example_sizes = marker_sizes(np.append(reconstruction_error, examples))[-3:]
        handles = [
            axes.scatter([], [], s=size, c="lightgray", edgecolors="black", linewidths=0.3)
            for size in example_sizes
        ]
        labels = [
            f"{label}: {value:.2e}"
            for label, value in zip(("median", "90th percentile", "maximum"), examples)
        ]
        axes.legend(
            handles,
            labels,
            title="reconstruction error (MSE)",
            loc="best",
            fontsize=8,
            title_fontsize=8,
            framealpha=0.8,
        )
    axes.set_xlabel("PaCMAP 1")
    axes.set_ylabel("PaCMAP 2")
    axes.set_title(title)
    figure.tight_layout()
    return figure


def embed(params: dict[str, dict[str, Any]]) -> str:
    """Run the embed stage with validated parameters; return its summary line."""
    settings = params["embed"]
    spectra = load_npy(SPECTRA_PATH, mmap=True)
    scores = read_csv(SCORES_PATH)
    recordings = read_csv(RECORDINGS_PATH)
    if not len(scores) == len(recordings) == spectra.shape[0]:
        raise PipelineError(
            f"{SCORES_PATH}, {RECORDINGS_PATH} and {SPECTRA_PATH} disagree in length; "
            "rerun the pipeline (dvc repro)"
        )
    log.info(
        "embed: PaCMAP of %d spectra, %d neighbours", spectra.shape[0], settings["n_neighbors"]
    )
    embedding, method = pacmap_embedding(
        spectra,
        n_neighbors=settings["n_neighbors"],
        mn_ratio=settings["mn_ratio"],
        fp_ratio=settings["fp_ratio"],
        random_state=settings["random_state"],
        parameter_prefix="embed",
        max_fit=params["compute"]["max_fit_recordings"],
    )
    forest = np.array([float(row["isolation_forest_score"]) for row in scores])
    error = np.array([float(row["reconstruction_error"]) for row in scores])

    write_npy(EMBEDDING_PATH, embedding)
    rows = (
        (
            score["recording_id"],
            float(embedding[i, 0]),
            float(embedding[i, 1]),
            forest[i],
            error[i],
            score["isolation_forest_rank"],
            score["reconstruction_error_rank"],
            recordings[i]["speaker"],
            score["set"],
        )
        for i, score in enumerate(scores)
    )
    write_csv(TABLE_PATH, TABLE_COLUMNS, rows)
    figure = draw_embedding(
        embedding,
        forest,
        error,
        f"{'PaCMAP' if method == 'pacmap' else 'PCA'} map of {len(scores)} spectra",
    )
    save_figure(figure, FIGURE_PATH)
    write_json(METRICS_PATH, {"recordings": len(scores), "method": method})
    return f"{EMBEDDING_PATH}, {FIGURE_PATH}, {TABLE_PATH} ({method})"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point of the embed stage."""
    return run_stage(
        "embed",
        "Embed the spectra in two dimensions with PaCMAP and draw the scored map.",
        lambda params, options: embed(params),
        argv,
    )


if __name__ == "__main__":
    exit_with(main())
