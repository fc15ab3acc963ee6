"""The PCA reconstruction as plain arrays, for stages that only reconstruct.

Loading the fitted scikit-learn models imports scikit-learn and SciPy, which
took about a second of every run of the inspect stage. The PCA
reconstruction and the feature scaling before it are affine maps. The detect
stage keeps them in ``data/models/pca_reconstruction.npy``, and they are
applied here with NumPy alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import PipelineError
from .outputs import load_npy

RECONSTRUCTION_FILE = "pca_reconstruction.npy"


@dataclass(frozen=True)
class LinearReconstruction:
    """Feature scaling followed by a PCA projection and its inverse.

    Attributes
    ----------
    feature_mean, feature_scale : np.ndarray [shape=(d,)]
        Features are scaled as ``(x - feature_mean) / feature_scale``; zeros
        and ones when the detectors were fitted on unscaled features.
    mean : np.ndarray [shape=(d,)]
        Mean of the scaled training features.
    components : np.ndarray [shape=(k, d)]
        Principal axes, one per row.
    """

    feature_mean: np.ndarray
    feature_scale: np.ndarray
    mean: np.ndarray
    components: np.ndarray

    def reconstruct(self, features: np.ndarray) -> np.ndarray:
        """Return the PCA reconstruction of features, in feature units."""
        scaled = (np.asarray(features, dtype=np.float64) - self.feature_mean) / self.feature_scale
        projected = (scaled - self.mean) @ self.components.T
        return (projected @ self.components + self.mean) * self.feature_scale + self.feature_mean

    def to_array(self) -> np.ndarray:
        """Stack the maps as rows: feature mean, feature scale, mean, components."""
        return np.vstack([self.feature_mean, self.feature_scale, self.mean, self.components])

    @classmethod
    def from_array(cls, rows: np.ndarray) -> LinearReconstruction:
        """Rebuild the maps from the rows that `to_array` stacked."""
        if rows.ndim != 2 or rows.shape[0] < 4:
            raise ValueError(f"expected at least 4 rows of features, got shape {rows.shape}")
        if not np.all(np.isfinite(rows)):
            raise ValueError("it contains values that are not finite")
        if not np.all(rows[1] > 0):
            raise ValueError("a feature scale is not positive")
        return cls(rows[0], rows[1], rows[2], rows[3:])


def load_reconstruction(models_dir: Path, n_features: int) -> LinearReconstruction | None:
    """Load the PCA reconstruction that the detect stage kept, if it kept one.

    Returns None when the reconstruction is an autoencoder, which is not
    linear. Its model is then loaded with the other models.

    Raises
    ------
    PipelineError
        If the file is damaged or does not have ``n_features`` columns.
    """
    path = models_dir / RECONSTRUCTION_FILE
    if not path.exists():
        return None
    try:
        rows = load_npy(path)
        if rows.ndim == 2 and rows.shape[1] != n_features:
            raise ValueError(f"{rows.shape[1]} columns, the spectra have {n_features}")
        return LinearReconstruction.from_array(rows)
    except ValueError as error:
        raise PipelineError(
            f"{path} is damaged ({error}); recreate it with dvc repro --force detect, "
            "or restore it with dvc checkout"
        ) from None
