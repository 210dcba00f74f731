"""Feature-space metrics for generated images: FD, KID, precision/recall/density/coverage, class histograms.

The features come from piflow's own small classifier (`piflow.eval.features.FeatureClassifier`), trained on
the dataset at hand, because no pretrained Inception network is available. The numbers here are therefore
*FD / KID in the features of piflow's classifier*, **not** FID / KID as published for Inception-v3: they are
comparable between runs that share one classifier checkpoint, never with numbers from papers.

Everything is pure torch, computed in float64, and returned as Python floats:

- `feature_statistics(f)` -> (mu (D,), cov (D, D)); `frechet_distance(mu1, cov1, mu2, cov2)`;
  `frechet_distance_from_features(f1, f2)`. The matrix square root uses symmetric eigendecompositions:
  tr sqrt(C1 C2) = sum_i sqrt(lambda_i(sqrt(C1) C2 sqrt(C1))), which is stable and needs no scipy.
- `kernel_inception_distance(f1, f2, ...)`: unbiased MMD^2 with the cubic polynomial kernel
  k(x, y) = (x.y / D + 1)^3, mean and std over random subsets.
- `precision_recall_density_coverage(real, fake, k)`: k-NN manifold estimates (Kynkäänniemi et al. 2019
  precision/recall, Naeem et al. 2020 density/coverage), with distances computed in row chunks.
- `class_histogram(labels_or_logits, num_classes)` and `class_histogram_tv(hist, target)`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from piflow.checks import is_int, positive_int
from piflow.eval.distances import as_points

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_inception_distance",
    "precision_recall_density_coverage",
    "class_histogram",
    "class_histogram_tv",
    "high_frequency_fraction",
    "nearest_neighbour_distances",
    "data_distance_ratio",
]

# Rows per block in the chunked pairwise distance computations (memory ~ chunk * N float64 values).
_DISTANCE_CHUNK = 1024


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------

def _as_tensor(x, name: str) -> Tensor:
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a tensor or array, got {type(x).__name__}") from None
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x.detach()


def as_features(x, name: str, min_rows: int = 1) -> Tensor:
    """Return x as a finite float64 (N, D) tensor, or raise ValueError naming `name`."""
    x = as_points(x, name, min_rows)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return x


def _feature_pair(f1, f2, min_rows: int, names: tuple[str, str] = ("f1", "f2")) -> tuple[Tensor, Tensor]:
    a = as_features(f1, names[0], min_rows)
    b = as_features(f2, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same feature dimension, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def _int(value, name: str) -> int:
    if not is_int(value):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------------

def feature_statistics(features) -> tuple[Tensor, Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of features (N, D) with N >= 2."""
    f = as_features(features, "features", min_rows=2)
    mu = f.mean(dim=0)
    centered = f - mu
    cov = centered.T @ centered / (f.shape[0] - 1)
    return mu, 0.5 * (cov + cov.T)


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (D, D) by eigendecomposition (negative eigenvalues -> 0)."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    root = eigenvalues.clamp_min(0.0).sqrt()
    return (eigenvectors * root) @ eigenvectors.T


def _check_moments(mu, cov, mu_name: str, cov_name: str) -> tuple[Tensor, Tensor]:
    mu = _as_tensor(mu, mu_name).to(torch.float64)
    cov = _as_tensor(cov, cov_name).to(torch.float64)
    if mu.dim() != 1 or mu.shape[0] < 1:
        raise ValueError(f"{mu_name} must have shape (D,), got shape {tuple(mu.shape)}")
    d = mu.shape[0]
    if cov.shape != (d, d):
        raise ValueError(f"{cov_name} must have shape ({d}, {d}) to match {mu_name}, got shape {tuple(cov.shape)}")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"{mu_name} contains NaN or infinite values")
    if not bool(torch.isfinite(cov).all()):
        raise ValueError(f"{cov_name} contains NaN or infinite values")
    scale = float(cov.abs().max()) if cov.numel() else 0.0
    if float((cov - cov.T).abs().max()) > 1e-6 * max(scale, 1e-30):
        raise ValueError(f"{cov_name} must be symmetric")
    return mu, 0.5 * (cov + cov.T)


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet distance between Gaussians N(mu1, cov1) and N(mu2, cov2) (mu: (D,), cov: (D, D)).

    FD = ||mu1 - mu2||^2 + tr(C1) + tr(C2) - 2 tr sqrt(C1 C2). The last trace is computed stably as
    sum_i sqrt(lambda_i) over the eigenvalues of the symmetric PSD matrix sqrt(C1) C2 sqrt(C1). Applied to
    piflow classifier features this is "FD in the features of piflow's classifier", not FID. Tiny negative
    round-off results are clamped to 0.
    """
    mu1, cov1 = _check_moments(mu1, cov1, "mu1", "cov1")
    mu2, cov2 = _check_moments(mu2, cov2, "mu2", "cov2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"mu1 and mu2 must have the same dimension, got {tuple(mu1.shape)} and {tuple(mu2.shape)}")
    mu2, cov2 = mu2.to(mu1.device), cov2.to(mu1.device)
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    middle = 0.5 * (middle + middle.T)
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp_min(0.0).sqrt().sum()
    mean_term = (mu1 - mu2).square().sum()
    value = float(mean_term + torch.trace(cov1) + torch.trace(cov2) - 2.0 * trace_sqrt)
    return max(value, 0.0)


def frechet_distance_from_features(f1, f2) -> float:
    """FD between Gaussian fits of features f1 (N, D) and f2 (M, D), N, M >= 2 (piflow classifier FD, not FID)."""
    a, b = _feature_pair(f1, f2, min_rows=2)
    mu1, cov1 = feature_statistics(a)
    mu2, cov2 = feature_statistics(b)
    return frechet_distance(mu1, cov1, mu2, cov2)


# ----------------------------------------------------------------------------------------------------------
# Kernel distance
# ----------------------------------------------------------------------------------------------------------

def _polynomial_kernel(x: Tensor, y: Tensor, degree: int) -> Tensor:
    """Kernel matrix (n, m) of k(a, b) = (a.b / D + 1)^degree between rows of x (n, D) and y (m, D)."""
    kernel = x @ y.T
    return kernel.div_(x.shape[1]).add_(1.0).pow_(degree)


def _polynomial_mmd2(x: Tensor, y: Tensor, degree: int) -> Tensor:
    """Unbiased MMD^2 between x (m, D) and y (m, D) with k(a, b) = (a.b / D + 1)^degree (0-d tensor)."""
    m = x.shape[0]
    k_xx = _polynomial_kernel(x, x, degree)
    k_yy = _polynomial_kernel(y, y, degree)
    k_xy = _polynomial_kernel(x, y, degree)
    off_xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    off_yy = (k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return off_xx + off_yy - 2.0 * k_xy.mean()


def kernel_inception_distance(f1, f2, num_subsets: int = 100, subset_size: int = 1000, degree: int = 3,
                              seed: int = 0) -> dict[str, float]:
    """Kernel distance (KID-style) between features f1 (N, D) and f2 (M, D) of piflow's classifier.

    For each of `num_subsets` subsets, draws m = min(subset_size, N, M) rows of each set without replacement
    (seeded, reproducible) and computes the unbiased MMD^2 with the polynomial kernel
    k(a, b) = (a.b / D + 1)^degree. Returns ``{"mean": ..., "std": ...}`` over subsets (population std; 0 for a
    single subset). The mean can be slightly negative when the distributions are equal. Not Inception KID.
    """
    a, b = _feature_pair(f1, f2, min_rows=2)
    num_subsets = positive_int(num_subsets, "num_subsets")
    subset_size = positive_int(subset_size, "subset_size")
    degree = positive_int(degree, "degree")
    seed = _int(seed, "seed")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    generator = torch.Generator().manual_seed(seed)
    values = torch.empty(num_subsets, dtype=torch.float64)
    for i in range(num_subsets):
        index_a = torch.randperm(a.shape[0], generator=generator)[:m].to(a.device)
        index_b = torch.randperm(b.shape[0], generator=generator)[:m].to(a.device)
        values[i] = _polynomial_mmd2(a[index_a], b[index_b], degree).cpu()
    return {"mean": float(values.mean()), "std": float(values.std(unbiased=False))}


# ----------------------------------------------------------------------------------------------------------
# Precision / recall / density / coverage
# ----------------------------------------------------------------------------------------------------------

def _pairwise_distances(x: Tensor, y: Tensor) -> Tensor:
    """Euclidean distances (n, m) between rows of x (n, D) and y (m, D), float64.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one matmul, ~8x faster than differences on CPU); the round-off is far
    below any k-NN radius of distinct points.
    """
    squared = x.square().sum(dim=1, keepdim=True) + y.square().sum(dim=1)[None, :]
    squared.addmm_(x, y.T, alpha=-2.0)
    return squared.clamp_min_(0.0).sqrt_()


def _knn_radii(x: Tensor, k: int, chunk: int) -> Tensor:
    """Distance (N,) from each row of x (N, D) to its k-th nearest other row (the row itself is excluded)."""
    radii = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], chunk):
        block = _pairwise_distances(x[start:start + chunk], x)  # (c, N), includes the zero self-distance
        radii[start:start + chunk] = torch.kthvalue(block, k + 1, dim=1).values
    return radii


def precision_recall_density_coverage(real_features, fake_features, k: int = 5,
                                      chunk_size: int = _DISTANCE_CHUNK) -> dict[str, float]:
    """k-NN precision, recall, density and coverage of fake features (M, D) against real features (N, D).

    With r_i the distance from real point i to its k-th nearest other real point and s_j likewise for fakes:
        precision = frac. of fakes j inside some real ball: exists i, d(x_i, y_j) <= r_i   (Kynkäänniemi 2019)
        recall    = frac. of reals i inside some fake ball: exists j, d(x_i, y_j) <= s_j
        density   = (1 / (k M)) sum_j #{i : d(x_i, y_j) <= r_i}                             (Naeem 2020)
        coverage  = frac. of reals i whose nearest fake lies inside their ball: min_j d(x_i, y_j) <= r_i
    Needs N, M > k. Distances are computed in row blocks of `chunk_size`, so memory is O(chunk_size * max(N, M)).
    Returns a dict with keys ``precision``, ``recall``, ``density``, ``coverage``.
    """
    k = positive_int(k, "k")
    chunk = positive_int(chunk_size, "chunk_size")
    real, fake = _feature_pair(real_features, fake_features, min_rows=k + 1,
                               names=("real_features", "fake_features"))
    real_radii = _knn_radii(real, k, chunk)  # (N,)
    fake_radii = _knn_radii(fake, k, chunk)  # (M,)
    fake_in_real_ball = torch.zeros(fake.shape[0], dtype=torch.bool, device=real.device)  # (M,)
    fake_ball_counts = torch.zeros(fake.shape[0], dtype=torch.float64, device=real.device)  # (M,)
    real_in_fake_ball = torch.empty(real.shape[0], dtype=torch.bool, device=real.device)  # (N,)
    real_covered = torch.empty(real.shape[0], dtype=torch.bool, device=real.device)  # (N,)
    for start in range(0, real.shape[0], chunk):
        stop = start + chunk
        dist = _pairwise_distances(real[start:stop], fake)  # (c, M)
        inside_real = dist <= real_radii[start:stop, None]  # (c, M)
        fake_in_real_ball |= inside_real.any(dim=0)
        fake_ball_counts += inside_real.sum(dim=0, dtype=torch.float64)
        real_in_fake_ball[start:stop] = (dist <= fake_radii[None, :]).any(dim=1)
        real_covered[start:stop] = dist.min(dim=1).values <= real_radii[start:stop]
    return {
        "precision": float(fake_in_real_ball.double().mean()),
        "recall": float(real_in_fake_ball.double().mean()),
        "density": float(fake_ball_counts.sum() / (k * fake.shape[0])),
        "coverage": float(real_covered.double().mean()),
    }


# ----------------------------------------------------------------------------------------------------------
# Class histograms
# ----------------------------------------------------------------------------------------------------------

def class_histogram(labels_or_logits, num_classes: int) -> Tensor:
    """Normalized class frequencies (num_classes,) float64 from labels (N,) ints or logits (N, num_classes).

    Logits are reduced with argmax. Labels must lie in [0, num_classes).
    """
    num_classes = positive_int(num_classes, "num_classes")
    x = _as_tensor(labels_or_logits, "labels_or_logits")
    if x.dim() == 2:
        if x.shape[1] != num_classes:
            raise ValueError(f"labels_or_logits as logits must have shape (N, {num_classes}), "
                             f"got shape {tuple(x.shape)}")
        if x.is_floating_point() and not bool(torch.isfinite(x).all()):
            raise ValueError("labels_or_logits contains NaN or infinite values")
        labels = x.argmax(dim=1)
    elif x.dim() == 1:
        if x.is_floating_point():
            if not bool((x == x.round()).all()):
                raise ValueError("labels_or_logits as labels (N,) must hold integers")
        labels = x.to(torch.int64)
    else:
        raise ValueError(f"labels_or_logits must be labels (N,) or logits (N, num_classes), "
                         f"got shape {tuple(x.shape)}")
    if labels.numel() == 0:
        raise ValueError("labels_or_logits must not be empty")
    if bool((labels < 0).any()) or bool((labels >= num_classes).any()):
        raise ValueError(f"labels_or_logits labels must lie in [0, {num_classes}), "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    counts = torch.bincount(labels.cpu(), minlength=num_classes).to(torch.float64)
    return counts / counts.sum()


def _as_histogram(h, name: str) -> Tensor:
    h = _as_tensor(h, name).to(torch.float64).cpu()
    if h.dim() != 1 or h.shape[0] < 1:
        raise ValueError(f"{name} must have shape (K,), got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise ValueError(f"{name} must hold finite non-negative values")
    total = float(h.sum())
    if total <= 0.0:
        raise ValueError(f"{name} must have a positive sum")
    return h / total


def class_histogram_tv(hist, target: Optional[Tensor] = None) -> float:
    """Total variation 0.5 * sum_k |p_k - q_k| between class histograms hist (K,) and target (K,), in [0, 1].

    Both are normalized to sum 1 first (raw counts are fine); `target=None` means the uniform distribution.
    """
    p = _as_histogram(hist, "hist")
    if target is None:
        q = torch.full_like(p, 1.0 / p.shape[0])
    else:
        q = _as_histogram(target, "target")
        if q.shape != p.shape:
            raise ValueError(f"hist and target must have the same length, got {p.shape[0]} and {q.shape[0]}")
    return float(0.5 * (p - q).abs().sum())


def high_frequency_fraction(images, cutoff: float = 0.5) -> float:
    """Share of the (mean-removed) spectral power of images (N, C, H, W) at radial frequencies above `cutoff`
    (in units of the Nyquist frequency, 0 < cutoff < 1), averaged over images: a pixel-space measure that sees
    speckle and grain, which small feature networks can miss. White noise gives the share of the frequency grid
    beyond the cutoff; a constant image gives 0 (no power at all counts as 0)."""
    x = _as_tensor(images, "images").double()
    if x.dim() != 4 or min(x.shape[2:]) < 2:
        raise ValueError(f"images must have shape (N, C, H, W) with H, W >= 2, got {tuple(x.shape)}")
    cutoff = float(cutoff)
    if not 0.0 < cutoff < 1.0:
        raise ValueError(f"cutoff must lie in (0, 1) (units of the Nyquist frequency), got {cutoff}")
    x = x - x.mean(dim=(2, 3), keepdim=True)
    power = torch.fft.fft2(x).abs().square().sum(dim=1)                      # (N, H, W)
    fy = torch.fft.fftfreq(x.shape[2], dtype=torch.float64).abs() * 2        # in Nyquist units, [0, 1]
    fx = torch.fft.fftfreq(x.shape[3], dtype=torch.float64).abs() * 2
    radius = (fy[:, None].square() + fx[None, :].square()).sqrt()
    total = power.sum(dim=(1, 2))
    high = (power * (radius > cutoff)).sum(dim=(1, 2))
    share = torch.where(total > 0, high / total.clamp(min=1e-300), torch.zeros_like(total))
    return float(share.mean())


def isolated_bright_pixels(images, threshold: float = 0.0) -> float:
    """Mean number per image of isolated bright pixels ("salt" speckle): pixels of images (N, C, H, W) in [-1, 1]
    above `threshold` in a channel whose 8 neighbours in that channel all lie at or below it (pixels outside the
    image count as dark). A stroke or a filled region has none; one stray white dot on black counts 1."""
    x = _as_tensor(images, "images").double()
    if x.dim() != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(x.shape)}")
    bright = (x > float(threshold)).double()
    kernel = torch.ones(1, 1, 3, 3, dtype=torch.float64)
    flat = bright.reshape(-1, 1, *x.shape[2:])
    neighbours = torch.nn.functional.conv2d(flat, kernel, padding=1) - flat          # bright neighbours
    isolated = (flat > 0) & (neighbours == 0)
    return float(isolated.reshape(x.shape[0], -1).sum(dim=1).double().mean()) if x.shape[0] else 0.0


def nearest_neighbour_distances(queries, reference, chunk_size: int = _DISTANCE_CHUNK) -> Tensor:
    """Euclidean distance (N,) from each row of `queries` (N, ...) to its nearest row of `reference` (M, ...),
    float64; both are flattened per row (images (N, C, H, W) compare pixel by pixel)."""
    q = _as_tensor(queries, "queries").double()
    r = _as_tensor(reference, "reference").double()
    if q.dim() < 2 or r.dim() < 2 or q.shape[0] < 1 or r.shape[0] < 1 or q.shape[1:] != r.shape[1:]:
        raise ValueError(f"queries and reference must be non-empty batches of one item shape, got "
                         f"{tuple(q.shape)} and {tuple(r.shape)}")
    q, r = q.flatten(1), r.flatten(1)
    chunk_size = positive_int(chunk_size, "chunk_size")
    return torch.cat([_pairwise_distances(q[i:i + chunk_size], r).min(dim=1).values
                      for i in range(0, q.shape[0], chunk_size)])


def data_distance_ratio(samples, held_out, train) -> float:
    """How far generated `samples` lie from the data, relative to real images the model never saw:
    median nearest-neighbour distance of the samples to `train` over the same median for `held_out` real
    images (all (N, ...) batches of one item shape). About 1 for a model that samples like the data, well below
    1 for one that copies its training images, above 1 for noisy, blurred or shapeless samples."""
    reference = float(nearest_neighbour_distances(held_out, train).median())
    if reference <= 0.0:
        raise ValueError("held_out must not be copies of train images (its median nearest-neighbour distance is 0)")
    return float(nearest_neighbour_distances(samples, train).median()) / reference
