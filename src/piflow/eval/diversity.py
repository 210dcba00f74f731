"""Diversity of a sample set in a feature space: mean pairwise distance and the Vendi score, overall or per class.

Mode-seeking students (distribution matching) keep quality but lose diversity; these measures see it where FD
mixes the two. Both take features (N, D):

* mean pairwise distance: the mean Euclidean distance over the N(N−1)/2 pairs (0 for a collapsed set);
* Vendi score (Friedman & Dieng, 2023) with the cosine-similarity kernel: exp of the Shannon entropy of the
  eigenvalues of K/N, K_ij = cos(f_i, f_j) — the "effective number of distinct samples": 1 for a collapsed set, N
  for N mutually orthogonal features, unchanged when every sample is duplicated. The nonzero eigenvalues of K/N
  equal those of the D×D matrix FᵀF/N of the unit-normalised features, so it costs O(N·D²), not O(N³).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from piflow.eval.image_metrics import as_features


def mean_pairwise_distance(features, chunk_size: int = 1024) -> float:
    """Mean ‖f_i − f_j‖ over the pairs i < j of features (N ≥ 2, D), in float64."""
    x = as_features(features, "features", min_rows=2).double()
    n, total = x.shape[0], 0.0
    for start in range(0, n, chunk_size):
        block = torch.cdist(x[start:start + chunk_size], x)               # (b, N)
        rows = torch.arange(start, min(start + chunk_size, n)).unsqueeze(1)
        total += float(block.masked_fill(torch.arange(n).unsqueeze(0) <= rows, 0.0).sum())
    return total / (n * (n - 1) / 2)


def vendi_score(features) -> float:
    """exp(−Σ λ log λ) over the eigenvalues λ of K/N, K the cosine-similarity matrix of features (N ≥ 1, D)."""
    x = as_features(features, "features", min_rows=1).double()
    norms = x.norm(dim=1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("features must have no all-zero rows (the cosine kernel needs a direction)")
    unit = x / norms
    n, d = unit.shape
    gram = unit.T @ unit / n if d < n else unit @ unit.T / n                # same nonzero spectrum
    eigenvalues = torch.linalg.eigvalsh(gram).clamp(min=0)
    eigenvalues = eigenvalues[eigenvalues > 1e-12]
    eigenvalues = eigenvalues / eigenvalues.sum()                           # trace of K/N is exactly 1
    return math.exp(float(-(eigenvalues * eigenvalues.log()).sum()))


def per_class_diversity(features, labels, min_per_class: int = 2, num_classes: Optional[int] = None) -> dict:
    """Mean over classes of the within-class mean pairwise distance and Vendi score (classes with at least
    `min_per_class` samples), plus the per-class values. features (N, D), labels (N,) integers."""
    x = as_features(features, "features", min_rows=2)
    labels = torch.as_tensor(labels)
    if labels.shape != (x.shape[0],) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},) matching features, "
                         f"got {tuple(labels.shape)} {labels.dtype}")
    if int(min_per_class) < 2:
        raise ValueError(f"min_per_class must be >= 2 (a pairwise distance needs two samples), got {min_per_class}")
    classes = range(num_classes) if num_classes is not None else sorted({int(c) for c in labels.tolist()})
    distances, vendi = {}, {}
    for c in classes:
        members = x[labels == c]
        if members.shape[0] >= min_per_class:
            distances[c] = mean_pairwise_distance(members)
            vendi[c] = vendi_score(members)
    if not distances:
        raise ValueError(f"no class has {min_per_class} or more samples")
    return {"mean_pairwise_distance": sum(distances.values()) / len(distances),
            "vendi": sum(vendi.values()) / len(vendi), "classes": len(distances),
            "per_class_pairwise_distance": distances, "per_class_vendi": vendi}
