"""Sample-based evaluation metrics."""
from piflow.eval.distances import (
    DEFAULT_MMD_BANDWIDTHS,
    coupling_error,
    energy_distance,
    mmd_rbf,
    mode_statistics,
    sliced_wasserstein2,
    wasserstein2_1d,
)

__all__ = [
    "DEFAULT_MMD_BANDWIDTHS",
    "coupling_error",
    "energy_distance",
    "mmd_rbf",
    "mode_statistics",
    "sliced_wasserstein2",
    "wasserstein2_1d",
]
