"""PaCMAP embedding shared by the ``embed`` and ``cluster`` stages.

PaCMAP (Wang et al. 2021, package ``pacmap``) places points in two
dimensions so that near neighbours, mid-near pairs and further pairs keep
their relations. Its compiled kernels are cached by Numba on first use, so
the first call in a fresh environment takes longer than later ones.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings

import numpy as np

from .errors import PipelineError
from .outputs import row_batches, take_rows

log = logging.getLogger("audiomnist_anomalies.mapping")

# Below this many points PaCMAP's neighbour scaling reads missing columns
# (it averages the 4th to 6th neighbour distances) and its pair sampling can
# loop forever, so smaller sets are mapped with a PCA projection instead.
MIN_PACMAP_POINTS = 20
# PaCMAP draws 6 distinct candidates for every mid-near pair.
MID_NEAR_CANDIDATES = 6
# Rows placed per call of PaCMAP's transform when it was fitted on a sample.
PLACE_BATCH = 8192


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def pair_counts(
    n_points: int, n_neighbors: int, mn_ratio: float, fp_ratio: float
) -> tuple[int, int, int]:
    """Return near, mid-near and further pair counts that ``n_points`` can supply.

    PaCMAP samples further pairs without replacement among the points that
    are not neighbours, and mid-near pairs from 6 distinct candidates, and
    loops forever when the points run out. The neighbour count is lowered
    until both samples fit, keeping the ratios where possible.
    """
    for neighbors in range(min(n_neighbors, n_points - 2), 0, -1):
        mid_near = int(round(neighbors * mn_ratio))
        further = int(round(neighbors * fp_ratio))
        fits_further = neighbors + further + 1 <= n_points
        fits_mid_near = mid_near == 0 or mid_near + MID_NEAR_CANDIDATES <= n_points
        # PaCMAP rescales all three counts itself when their sum reaches n.
        fits_total = neighbors + mid_near + further < n_points
        if fits_further and fits_mid_near and fits_total:
            return neighbors, mid_near, further
    return 1, 0, max(0, n_points - 2)


def pca_projection(features: np.ndarray) -> np.ndarray:
    """Project rows on their first two principal components (zeros where undefined)."""
    centred = features - features.mean(axis=0)
    embedding = np.zeros((features.shape[0], 2))
    if features.shape[0] > 1:
        _, singular_values, components = np.linalg.svd(centred, full_matrices=False)
        count = min(2, components.shape[0])
        embedding[:, :count] = centred @ components[:count].T
        # Fix the sign of each axis so the projection does not depend on the SVD.
        for axis in range(count):
            column = embedding[:, axis]
            if column[np.argmax(np.abs(column))] < 0:
                embedding[:, axis] = -column
    return embedding.astype(np.float32)


def pacmap_embedding(
    features: np.ndarray,
    *,
    n_neighbors: int,
    mn_ratio: float,
    fp_ratio: float,
    random_state: int,
    parameter_prefix: str,
    max_fit: int | None = None,
    stage: str | None = None,
) -> tuple[np.ndarray, str]:
    """Embed rows of ``features`` in two dimensions with PaCMAP.

    Parameters
    ----------
    features : np.ndarray [shape=(n, d)]
        One row per recording.
    n_neighbors : int
        Number of near neighbours per point; lowered with a warning when
        the data set is too small for it (see `pair_counts`).
    mn_ratio, fp_ratio : float
        Mid-near and further pairs per near pair.
    random_state : int
        Seed; with it the embedding is the same on every run.
    parameter_prefix : str
        Section of ``params.yaml`` the values come from, for messages.
    max_fit : int, optional
        With more rows than this, PaCMAP is fitted on a seeded sample of
        ``max_fit`` rows and places the others with its ``transform``, in
        batches; each placed point depends only on the fitted map, so the
        cost grows linearly beyond ``max_fit``.
    stage : str, optional
        Stage that names the log messages; ``parameter_prefix`` by default.

    Returns
    -------
    embedding : np.ndarray [shape=(n, 2), dtype=float32]
    method : str
        ``"pacmap"``, or ``"pca"`` for fewer than ``MIN_PACMAP_POINTS`` rows.

    Raises
    ------
    PipelineError
        If there are no rows, or PaCMAP returns non-finite coordinates.
    """
    stage = stage or parameter_prefix
    n_points = features.shape[0]
    if n_points == 0:
        raise PipelineError("cannot map an empty set of recordings")
    if n_points < MIN_PACMAP_POINTS:
        log.warning(
            "%s: %d recordings are too few for PaCMAP (at least %d); using the first "
            "two principal components instead",
            stage,
            n_points,
            MIN_PACMAP_POINTS,
        )
        return pca_projection(features.astype(np.float64)), "pca"

    import pacmap

    fit_points = n_points if max_fit is None else min(n_points, max_fit)
    neighbors, mid_near, further = pair_counts(fit_points, n_neighbors, mn_ratio, fp_ratio)
    if neighbors != n_neighbors:
        log.warning(
            "%s: %s.n_neighbors = %d is too large for %d recordings; using %d",
            stage,
            parameter_prefix,
            n_neighbors,
            n_points,
            neighbors,
        )
    fitted = np.arange(n_points)
    if max_fit is not None and n_points > max_fit:
        generator = np.random.default_rng(random_state)
        fitted = np.sort(generator.choice(n_points, size=max_fit, replace=False))
        log.info(
            "%s: PaCMAP fitted on a sample of %d of %d recordings, the others placed "
            "with its transform (compute.max_fit_recordings)",
            stage,
            max_fit,
            n_points,
        )
    data = np.ascontiguousarray(take_rows(features, fitted), dtype=np.float32)
    # PaCMAP's PCA step keeps 100 components, so it needs more than 100 rows and columns.
    apply_pca = data.shape[1] > 100 and data.shape[0] > 100
    # PaCMAP warns about the adjustments above on its own logger; keep only errors.
    pacmap_log = logging.getLogger("pacmap.pacmap")
    pacmap_log.addFilter(_errors_only)
    try:
        # PaCMAP prints a note about the random state to standard output.
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            reducer = pacmap.PaCMAP(
                n_components=2,
                n_neighbors=neighbors,
                MN_ratio=mid_near / neighbors,
                FP_ratio=further / neighbors,
                random_state=random_state,
                apply_pca=apply_pca,
                save_tree=fitted.shape[0] < n_points,
            )
            embedding = np.empty((n_points, 2), dtype=np.float32)
            embedding[fitted] = reducer.fit_transform(data, init="pca")
            if fitted.shape[0] < n_points:
                del data
                rest = np.ones(n_points, dtype=bool)
                rest[fitted] = False
                for start, rows in row_batches(features, PLACE_BATCH):
                    placed = rest[start : start + rows.shape[0]]
                    if placed.any():
                        embedding[start : start + rows.shape[0]][placed] = reducer.transform(
                            np.ascontiguousarray(rows[placed], dtype=np.float32)
                        )
    finally:
        pacmap_log.removeFilter(_errors_only)
    embedding = np.asarray(embedding, dtype=np.float32)
    if not np.all(np.isfinite(embedding)):
        raise PipelineError(
            f"PaCMAP returned non-finite coordinates for {parameter_prefix}; try "
            f"another {parameter_prefix}.random_state or fewer neighbours"
        )
    return embedding, "pacmap"
