"""Sample-based distances between point clouds x (N, D) and y (M, D), plus mode statistics for mixtures.

All metrics compute in float64 and return Python floats. Pairwise metrics (energy distance, MMD) are
evaluated block by block, so memory stays O(chunk_size^2) even for N = M = 20000. The unbiased estimators
(energy distance, MMD^2) can come out slightly negative when the two distributions are equal.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from piflow.checks import positive_int
from piflow.data.toy2d import GaussianMixture2D, assign_modes

__all__ = [
    "as_points",
    "wasserstein2_1d",
    "sliced_wasserstein2",
    "energy_distance",
    "mmd_rbf",
    "mode_statistics",
    "coupling_error",
    "DEFAULT_MMD_BANDWIDTHS",
]

DEFAULT_MMD_BANDWIDTHS: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)

# Budget (number of float64 entries) for the (N + M, projections) gathers in the sliced W2.
_SLICED_ENTRY_BUDGET = 1 << 23


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------

def as_points(x: Tensor, name: str, min_rows: int = 1) -> Tensor:
    """Return a point cloud x (N, D) as a detached float64 tensor, or raise a ValueError naming `name`.

    Accepts a tensor or anything `torch.as_tensor` takes (arrays, nested lists). Requires exactly two
    dimensions, D >= 1 columns, at least `min_rows` rows and a real (not complex or bool) dtype; the device is
    kept. Shared by the sample distances here and the feature metrics in `piflow.eval.image_metrics`.
    """
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a (N, D) tensor, got {type(x).__name__}") from None
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got shape {tuple(x.shape)}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column (D >= 1), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} must have at least {min_rows} row(s), got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold real numbers, got dtype {x.dtype}")
    return x.detach().to(torch.float64)


def _as_values(x: Tensor, name: str) -> Tensor:
    """Return a 1-D sample x (N,) as a detached float64 (N, 1) tensor, or raise ValueError naming `name`."""
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{name} must be a (N,) tensor, got {type(x).__name__}") from None
    if x.dim() != 1:
        raise ValueError(f"{name} must have shape (N,), got shape {tuple(x.shape)}")
    return as_points(x[:, None], name)


def _as_pair(x: Tensor, y: Tensor, min_rows: int = 1) -> tuple[Tensor, Tensor]:
    """Validate two point clouds with the same dimension D and put them on one device, float64."""
    x = as_points(x, "x", min_rows)
    y = as_points(y, "y", min_rows)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension D, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y.to(x.device)


# ----------------------------------------------------------------------------------------------------------
# Sliced Wasserstein-2
# ----------------------------------------------------------------------------------------------------------

def _w2_squared_sorted(x_sorted: Tensor, y_sorted: Tensor) -> Tensor:
    """Exact squared 1-D W2 between empirical measures, per column.

    x_sorted (N, P) and y_sorted (M, P) hold sorted samples along dim 0; returns (P,). The quantile functions
    are step functions on the grids {k/N} and {l/M}; on the merged grid both are constant on every interval,
    so W2^2 = sum over intervals of width * (x_quantile - y_quantile)^2 exactly. Grid points are kept as
    integers in units of 1/(N*M) to avoid rounding.
    """
    n, m = x_sorted.shape[0], y_sorted.shape[0]
    if n == m:
        return ((x_sorted - y_sorted) ** 2).mean(dim=0)
    device = x_sorted.device
    ticks = torch.cat([torch.arange(1, n + 1, device=device) * m,
                       torch.arange(1, m + 1, device=device) * n])
    ticks = torch.unique(ticks)  # sorted, ends at n * m
    widths = torch.diff(ticks, prepend=ticks.new_zeros(1)).to(torch.float64) / (n * m)  # (G,)
    x_index = torch.div(ticks - 1, m, rounding_mode="floor")  # quantile on (t_prev, t] -> sample index
    y_index = torch.div(ticks - 1, n, rounding_mode="floor")
    diff = x_sorted[x_index] - y_sorted[y_index]  # (G, P)
    return (widths[:, None] * diff ** 2).sum(dim=0)


def wasserstein2_1d(x: Tensor, y: Tensor) -> float:
    """Exact W2 between the 1-D empirical measures of x (N,) and y (M,) (uniform weights, N != M allowed)."""
    x_flat = _as_values(x, "x")
    y_flat = _as_values(y, "y")
    x_sorted = torch.sort(x_flat, dim=0).values
    y_sorted = torch.sort(y_flat.to(x_flat.device), dim=0).values
    return math.sqrt(max(float(_w2_squared_sorted(x_sorted, y_sorted)[0]), 0.0))


def sliced_wasserstein2(x: Tensor, y: Tensor, num_projections: int = 256,
                        generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between x (N, D) and y (M, D).

    SW2 = sqrt(mean over random unit directions theta of W2^2(theta.x, theta.y)), with directions drawn
    uniformly on the sphere (normalized Gaussians, from `generator` if given). Each 1-D W2 is exact: by
    sorting when N == M, and on the merged quantile grid of the two empirical measures otherwise.
    """
    x, y = _as_pair(x, y)
    num_projections = positive_int(num_projections, "num_projections")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    dim = x.shape[1]
    direction_device = generator.device if generator is not None else torch.device("cpu")
    directions = torch.randn(num_projections, dim, dtype=torch.float64, generator=generator,
                             device=direction_device)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-300)
    directions = directions.to(x.device)
    # Centre both clouds by the same vector (W2 is translation-equivariant) to reduce rounding.
    centre = 0.5 * (x.mean(dim=0) + y.mean(dim=0))
    x, y = x - centre, y - centre
    per_chunk = max(1, _SLICED_ENTRY_BUDGET // (x.shape[0] + y.shape[0]))
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, num_projections, per_chunk):
        theta = directions[start:start + per_chunk]  # (p, D)
        x_proj = torch.sort(x @ theta.T, dim=0).values  # (N, p)
        y_proj = torch.sort(y @ theta.T, dim=0).values  # (M, p)
        total = total + _w2_squared_sorted(x_proj, y_proj).sum()
    return math.sqrt(max(float(total) / num_projections, 0.0))


# ----------------------------------------------------------------------------------------------------------
# Pairwise (chunked) statistics
# ----------------------------------------------------------------------------------------------------------

def _pairwise_sum(a: Tensor, b: Tensor, value_fn: Callable[[Tensor], Tensor], same: bool,
                  chunk_size: int) -> float:
    """Sum of value_fn(||a_i - b_j||^2) over all pairs (i, j), computed block by block.

    value_fn maps a (n, m) block of squared distances to per-pair values of the same shape; it may overwrite
    its input.
    With `same` (a is b), the diagonal pairs i == j are excluded and symmetry is used to visit only blocks on
    or above the block diagonal. a (N, D), b (M, D) float64 on one device.
    """
    a_sq = (a * a).sum(dim=1)
    b_sq = a_sq if same else (b * b).sum(dim=1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for row in range(0, a.shape[0], chunk_size):
        a_block, a_block_sq = a[row:row + chunk_size], a_sq[row:row + chunk_size]
        for col in range(row if same else 0, b.shape[0], chunk_size):
            b_block, b_block_sq = b[col:col + chunk_size], b_sq[col:col + chunk_size]
            sq_dist = (a_block_sq[:, None] + b_block_sq[None, :]).addmm_(a_block, b_block.T, alpha=-2.0)
            values = value_fn(sq_dist.clamp_min_(0.0))  # value_fn may work in place on sq_dist
            if same and col == row:
                total = total + values.sum() - values.diagonal().sum()
            elif same:
                total = total + 2.0 * values.sum()
            else:
                total = total + values.sum()
    return float(total)


def _sqrt_in_place(sq_dist: Tensor) -> Tensor:
    return sq_dist.sqrt_()


def _centred(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Shift both clouds by their joint mean (distances are unchanged, rounding in ||a||^2 - 2ab is smaller)."""
    centre = torch.cat([x, y], dim=0).mean(dim=0)
    return x - centre, y - centre


def energy_distance(x: Tensor, y: Tensor, chunk_size: int = 1024) -> float:
    """Energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| between x (N, D) and y (M, D), N, M >= 2.

    The within-set means exclude the diagonal (unbiased U-statistics: sum over i != j divided by N(N-1)).
    Computed in (chunk_size x chunk_size) blocks, so memory is O(chunk_size^2).
    """
    x, y = _as_pair(x, y, min_rows=2)
    chunk_size = positive_int(chunk_size, "chunk_size")
    x, y = _centred(x, y)
    n, m = x.shape[0], y.shape[0]
    cross = _pairwise_sum(x, y, _sqrt_in_place, same=False, chunk_size=chunk_size) / (n * m)
    within_x = _pairwise_sum(x, x, _sqrt_in_place, same=True, chunk_size=chunk_size) / (n * (n - 1))
    within_y = _pairwise_sum(y, y, _sqrt_in_place, same=True, chunk_size=chunk_size) / (m * (m - 1))
    return 2.0 * cross - within_x - within_y


def mmd_rbf(x: Tensor, y: Tensor, bandwidths: Sequence[float] = DEFAULT_MMD_BANDWIDTHS,
            chunk_size: int = 1024) -> float:
    """Unbiased squared MMD between x (N, D) and y (M, D), N, M >= 2, with a sum of RBF kernels.

    k(a, b) = sum over sigma in `bandwidths` of exp(-||a - b||^2 / (2 sigma^2)). Within-set sums exclude the
    diagonal. Computed in (chunk_size x chunk_size) blocks.
    """
    x, y = _as_pair(x, y, min_rows=2)
    chunk_size = positive_int(chunk_size, "chunk_size")
    try:
        sigmas = [float(s) for s in bandwidths]
    except (TypeError, ValueError):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive floats, got {bandwidths!r}") from None
    if not sigmas or any(not math.isfinite(s) or s <= 0.0 for s in sigmas):
        raise ValueError(f"bandwidths must be a non-empty sequence of positive floats, got {bandwidths!r}")
    inv_two_var = [1.0 / (2.0 * s * s) for s in sigmas]

    def kernel(sq_dist: Tensor) -> Tensor:
        if len(inv_two_var) == 1:
            return sq_dist.mul_(-inv_two_var[0]).exp_()
        out = torch.zeros_like(sq_dist)
        scratch = torch.empty_like(sq_dist)
        for coefficient in inv_two_var:
            torch.mul(sq_dist, -coefficient, out=scratch)
            out.add_(scratch.exp_())
        return out

    x, y = _centred(x, y)
    n, m = x.shape[0], y.shape[0]
    k_xx = _pairwise_sum(x, x, kernel, same=True, chunk_size=chunk_size) / (n * (n - 1))
    k_yy = _pairwise_sum(y, y, kernel, same=True, chunk_size=chunk_size) / (m * (m - 1))
    k_xy = _pairwise_sum(x, y, kernel, same=False, chunk_size=chunk_size) / (n * m)
    return k_xx + k_yy - 2.0 * k_xy


# ----------------------------------------------------------------------------------------------------------
# Mixture-aware and paired statistics
# ----------------------------------------------------------------------------------------------------------

def mode_statistics(x: Tensor, mixture: GaussianMixture2D, min_fraction: float = 0.1,
                    max_sigmas: float = 3.0) -> dict[str, float | int]:
    """Mode coverage statistics of samples x (N, 2) against a Gaussian mixture.

    Points are assigned with `assign_modes(x, mixture, max_sigmas)`. Returns a dict with:
        ``modes_covered`` (int): modes k with count_k >= min_fraction * weight_k * N (N = all points,
            outliers included).
        ``num_modes`` (int): K.
        ``mode_mass_error`` (float): total variation 0.5 * sum_k |count_k / N_in - weight_k| between the mode
            histogram of in-mode points (N_in of them) and the true weights; 1.0 when no point is in a mode.
        ``outlier_fraction`` (float): fraction of points assigned -1.
    """
    if not isinstance(mixture, GaussianMixture2D):
        raise ValueError(f"mixture must be a GaussianMixture2D, got {type(mixture).__name__}")
    try:
        min_fraction = float(min_fraction)
    except (TypeError, ValueError):
        raise ValueError(f"min_fraction must be a float in [0, 1], got {min_fraction!r}") from None
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be a float in [0, 1], got {min_fraction!r}")
    x = as_points(x, "x")
    if x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got shape {tuple(x.shape)}")
    labels = assign_modes(x, mixture, max_sigmas=max_sigmas)
    num_points = labels.shape[0]
    num_modes = mixture.num_modes
    in_mode = labels >= 0
    counts = torch.bincount(labels[in_mode], minlength=num_modes).to(torch.float64)  # (K,)
    weights = mixture.weights.to(torch.float64)
    covered = int((counts >= min_fraction * weights * num_points).sum())
    num_in_mode = float(counts.sum())
    if num_in_mode > 0:
        mass_error = 0.5 * float((counts / num_in_mode - weights).abs().sum())
    else:
        mass_error = 1.0
    return {
        "modes_covered": covered,
        "num_modes": num_modes,
        "mode_mass_error": mass_error,
        "outlier_fraction": float((~in_mode).sum()) / num_points,
    }


def coupling_error(x: Tensor, y: Tensor) -> float:
    """Mean over rows of ||x_i - y_i||_2 for paired samples x, y (N, D) (e.g. generated from the same noise)."""
    x = as_points(x, "x")
    y = as_points(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have exactly the same shape, got x {tuple(x.shape)} and y {tuple(y.shape)}")
    return float((x - y.to(x.device)).norm(dim=1).mean())
