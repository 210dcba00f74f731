"""Datasets for pi-Flow experiments: 2-D toy data and offline image datasets."""
from piflow.data.toy2d import (
    TOY_DATASET_NAMES,
    GaussianMixture2D,
    ToyDataset2D,
    assign_modes,
    checkerboard_white_mask,
    make_toy_dataset,
)
from piflow.data.images import (
    IMAGE_DATASET_NAMES,
    ImageDataset,
    ImageFolderDataset,
    LatentDataset,
    load_digits_dataset,
    load_idx_dataset,
    make_image_dataset,
    read_idx,
    write_idx,
)

__all__ = [
    "TOY_DATASET_NAMES",
    "GaussianMixture2D",
    "ToyDataset2D",
    "assign_modes",
    "checkerboard_white_mask",
    "make_toy_dataset",
    "IMAGE_DATASET_NAMES",
    "ImageDataset",
    "ImageFolderDataset",
    "LatentDataset",
    "load_digits_dataset",
    "load_idx_dataset",
    "make_image_dataset",
    "read_idx",
    "write_idx",
]
