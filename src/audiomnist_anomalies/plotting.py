"""Matplotlib set-up shared by the figure-drawing stages."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

# Fixed style so figures do not depend on a user's matplotlibrc.
plt.rcParams.update(
    {
        "figure.dpi": 100,
        "font.size": 9,
        "axes.titlesize": 10,
        "svg.hashsalt": "audiomnist-anomalies",
        "path.simplify": True,
    }
)


def marker_sizes(values, smallest: float = 4.0, largest: float = 120.0):
    """Scale non-negative values linearly to marker areas in points squared."""
    import numpy as np

    values = np.asarray(values, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if top <= 0:
        return np.full(values.shape, smallest)
    return smallest + (largest - smallest) * values / top
