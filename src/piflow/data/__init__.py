"""Toy datasets for pi-Flow experiments."""
from piflow.data.toy2d import (
    TOY_DATASET_NAMES,
    GaussianMixture2D,
    ToyDataset2D,
    assign_modes,
    checkerboard_white_mask,
    make_toy_dataset,
)

__all__ = [
    "TOY_DATASET_NAMES",
    "GaussianMixture2D",
    "ToyDataset2D",
    "assign_modes",
    "checkerboard_white_mask",
    "make_toy_dataset",
]
