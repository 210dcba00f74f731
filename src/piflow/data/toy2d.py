"""2-D toy datasets: Gaussian mixtures (ring, grid), a checkerboard and two moons.

Every dataset is a `ToyDataset2D` whose `sample(n, generator)` returns an (n, 2) float32 CPU tensor and is
deterministic given a seeded `torch.Generator`. Internally all sampling math runs in float64. Mixture datasets
also carry their exact `GaussianMixture2D`, so that evaluation code can assign samples to modes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from piflow.checks import is_int, positive_int

__all__ = [
    "GaussianMixture2D",
    "ToyDataset2D",
    "TOY_DATASET_NAMES",
    "make_toy_dataset",
    "assign_modes",
    "checkerboard_white_mask",
]

TOY_DATASET_NAMES: tuple[str, ...] = ("ring8", "grid25", "checkerboard", "moons")


def _check_generator(generator: torch.Generator | None) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def _check_num_samples(n: int) -> int:
    if not is_int(n) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return int(n)


def _positive_float(value: float, name: str) -> float:
    """`value` as a float if it converts to a finite float > 0, else a ValueError naming `name`.

    Kept local rather than `piflow.checks.positive_float`: it accepts anything `float()` takes (bools, numeric
    strings, 0-d tensors) and says "positive finite float".
    """
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite float, got {value!r}") from None
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be a positive finite float, got {value!r}")
    return value


def _normalized_weights(weights: Sequence[float] | Tensor, num_modes: int, name: str = "weights") -> Tensor:
    """Validate non-negative weights of shape (K,) with a positive sum and return them normalized, float64."""
    try:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a sequence of {num_modes} non-negative floats, got {weights!r}") from None
    if w.shape != (num_modes,):
        raise ValueError(f"{name} must have shape ({num_modes},), got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0.0:
        raise ValueError(f"{name} must be finite, non-negative and have a positive sum, got {w.tolist()}")
    return w / w.sum()


@dataclass(frozen=True, eq=False)
class GaussianMixture2D:
    """A mixture of K isotropic 2-D Gaussians sharing one standard deviation.

    Attributes:
        means: (K, 2) float64 component means.
        std: shared isotropic standard deviation (> 0).
        weights: (K,) float64 mixture weights, non-negative and summing to 1 (they are validated to sum to 1
            within 1e-6 and then renormalized exactly).
    """

    means: Tensor
    std: float
    weights: Tensor

    def __post_init__(self) -> None:
        try:
            means = torch.as_tensor(self.means, dtype=torch.float64).detach().cpu().clone()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"means must be a (K, 2) float tensor, got {self.means!r}") from None
        if means.dim() != 2 or means.shape[1] != 2 or means.shape[0] < 1:
            raise ValueError(f"means must have shape (K, 2) with K >= 1, got shape {tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means contains non-finite values (NaN or Inf)")
        std = _positive_float(self.std, "std")
        num_modes = means.shape[0]
        try:
            raw = torch.as_tensor(self.weights, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"weights must be a ({num_modes},) float tensor, got {self.weights!r}") from None
        weights = _normalized_weights(raw, num_modes)
        if abs(float(raw.sum()) - 1.0) > 1e-6:
            raise ValueError(f"weights must sum to 1, got sum {float(raw.sum())!r}")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "weights", weights)

    @property
    def num_modes(self) -> int:
        """Number of components K."""
        return int(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n i.i.d. samples, returned as an (n, 2) float32 tensor."""
        return self._sample_with_labels(n, generator)[0]

    def _sample_with_labels(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Return samples (n, 2) float32 and their component labels (n,) long."""
        n = _check_num_samples(n)
        _check_generator(generator)
        if n == 0:
            return torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        points = self.means[labels] + self.std * noise
        return points.to(torch.float32), labels

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of points x (N, 2); returns (N,) in float64."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != 2:
            raise ValueError(f"x must have shape (N, 2), got shape {tuple(x.shape)}")
        x = x.detach().to(dtype=torch.float64, device="cpu")
        sq_dist = ((x[:, None, :] - self.means[None, :, :]) ** 2).sum(-1)  # (N, K)
        log_norm = -math.log(2.0 * math.pi * self.std ** 2)
        log_comp = log_norm - 0.5 * sq_dist / self.std ** 2 + torch.log(self.weights)[None, :]
        return torch.logsumexp(log_comp, dim=1)


@dataclass(frozen=True, eq=False)
class ToyDataset2D:
    """A named 2-D toy distribution.

    Attributes:
        name: dataset name, e.g. ``"ring8"``.
        sampler: callable ``(n, generator) -> (n, 2) float32`` doing the actual sampling.
        mixture: the exact Gaussian mixture for mixture datasets (ring8, grid25), else None.
    """

    name: str
    sampler: Callable[[int, torch.Generator | None], Tensor] = field(repr=False)
    mixture: GaussianMixture2D | None = None

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw n i.i.d. samples as an (n, 2) float32 CPU tensor; deterministic given `generator`."""
        n = _check_num_samples(n)
        _check_generator(generator)
        return self.sampler(n, generator)


# ----------------------------------------------------------------------------------------------------------
# Dataset builders
# ----------------------------------------------------------------------------------------------------------

def _ring_mixture(radius: float = 4.0, std: float = 0.2, num_modes: int = 8,
                  weights: Sequence[float] | Tensor | None = None) -> GaussianMixture2D:
    """K Gaussians evenly spaced on a circle, the first at angle 0 (on the +x axis)."""
    radius = _positive_float(radius, "radius")
    std = _positive_float(std, "std")
    num_modes = positive_int(num_modes, "num_modes")
    angles = 2.0 * math.pi * torch.arange(num_modes, dtype=torch.float64) / num_modes
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    if weights is None:
        w = torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64)
    else:
        w = _normalized_weights(weights, num_modes)
    return GaussianMixture2D(means=means, std=std, weights=w)


def _grid_mixture(grid_size: int = 5, spacing: float = 2.0, std: float = 0.15) -> GaussianMixture2D:
    """grid_size x grid_size equally weighted Gaussians on a square grid centred at the origin."""
    grid_size = positive_int(grid_size, "grid_size")
    spacing = _positive_float(spacing, "spacing")
    std = _positive_float(std, "std")
    coords = (torch.arange(grid_size, dtype=torch.float64) - (grid_size - 1) / 2.0) * spacing
    gx, gy = torch.meshgrid(coords, coords, indexing="ij")
    means = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    num_modes = grid_size * grid_size
    weights = torch.full((num_modes,), 1.0 / num_modes, dtype=torch.float64)
    return GaussianMixture2D(means=means, std=std, weights=weights)


def checkerboard_white_mask(x: Tensor, scale: float = 4.0) -> Tensor:
    """Boolean mask (N,) telling which points x (N, 2) lie in a white square of the 4x4 checkerboard.

    The board covers [-scale, scale]^2 with square side scale / 2; cell (i, j) (column i along x, row j along
    y, both counted from the lower-left corner) is white when i + j is even. Points outside the board are
    False.
    """
    scale = _positive_float(scale, "scale")
    x = torch.as_tensor(x)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got shape {tuple(x.shape)}")
    x = x.detach().to(torch.float64)
    position = (x + scale) / (scale / 2.0)  # (N, 2), board coordinates in cell units, [0, 4] on the board
    cells = torch.floor(position).clamp(0, 3)  # the upper edge position == 4 belongs to the last cell
    inside = ((position >= 0.0) & (position <= 4.0)).all(dim=1)
    white = cells.sum(dim=1).remainder(2) == 0
    # A point exactly on an interior grid line touches a white square (colours alternate across the line).
    # This keeps float32 samples that rounded onto a cell edge counted as white.
    on_interior_line = ((position == torch.round(position)) & (position > 0.0) & (position < 4.0)).any(dim=1)
    return inside & (white | on_interior_line)


def _checkerboard_sampler(scale: float = 4.0) -> Callable[[int, torch.Generator | None], Tensor]:
    scale = _positive_float(scale, "scale")
    # The 8 white cells (i + j even) of a 4x4 board, as lower-left corners in cell units.
    white_cells = torch.tensor([[i, j] for i in range(4) for j in range(4) if (i + j) % 2 == 0],
                               dtype=torch.float64)  # (8, 2)

    def sample(n: int, generator: torch.Generator | None) -> Tensor:
        cell_index = torch.randint(0, white_cells.shape[0], (n,), generator=generator)
        offset = torch.rand(n, 2, dtype=torch.float64, generator=generator)
        unit = (white_cells[cell_index] + offset) / 4.0  # in [0, 1]^2
        return ((2.0 * unit - 1.0) * scale).to(torch.float32)  # [0,1] -> [-1,1] -> [-scale, scale]

    return sample


def _moons_sampler(noise: float = 0.1, scale: float = 2.0) -> Callable[[int, torch.Generator | None], Tensor]:
    """Two interleaved half circles of radius 1 (upper: centre (0, 0); lower: centre (1, 0.5)).

    The union is centred at the origin (shift by (-0.5, -0.25)) and multiplied by `scale`, so with the default
    scale 2 the clean curves span [-3, 3] x [-1.5, 1.5]. Gaussian noise of std `noise` (in output units) is
    added, and each point picks either moon with probability 1/2.
    """
    scale = _positive_float(scale, "scale")
    try:
        noise = float(noise)
    except (TypeError, ValueError):
        raise ValueError(f"noise must be a non-negative finite float, got {noise!r}") from None
    if not math.isfinite(noise) or noise < 0.0:
        raise ValueError(f"noise must be a non-negative finite float, got {noise!r}")

    def sample(n: int, generator: torch.Generator | None) -> Tensor:
        lower = torch.rand(n, dtype=torch.float64, generator=generator) < 0.5
        angle = math.pi * torch.rand(n, dtype=torch.float64, generator=generator)
        upper_xy = torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
        lower_xy = torch.stack([1.0 - torch.cos(angle), 0.5 - torch.sin(angle)], dim=1)
        clean = torch.where(lower[:, None], lower_xy, upper_xy)
        clean = (clean - torch.tensor([0.5, 0.25], dtype=torch.float64)) * scale
        jitter = noise * torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return (clean + jitter).to(torch.float32)

    return sample


_ALLOWED_KWARGS: dict[str, tuple[str, ...]] = {
    "ring8": ("radius", "std", "num_modes", "weights"),
    "grid25": ("grid_size", "spacing", "std"),
    "checkerboard": ("scale",),
    "moons": ("noise", "scale"),
}


def make_toy_dataset(name: str, **kwargs) -> ToyDataset2D:
    """Build a named 2-D toy dataset.

    Names and keyword arguments (defaults in brackets):
        ``"ring8"``: Gaussians on a circle; radius [4.0], std [0.2], num_modes [8], weights [equal; any
            non-negative sequence of length num_modes is accepted and normalized].
        ``"grid25"``: 5x5 grid centred at 0; grid_size [5], spacing [2.0], std [0.15]; equal weights.
        ``"checkerboard"``: 8 white squares of a 4x4 board filled uniformly on [-scale, scale]^2; scale [4.0].
        ``"moons"``: two interleaved moons spanning about [-3, 3] x [-1.5, 1.5]; noise [0.1], scale [2.0].
    """
    if not isinstance(name, str) or name not in _ALLOWED_KWARGS:
        raise ValueError(f"name must be one of {list(TOY_DATASET_NAMES)}, got {name!r}")
    unknown = sorted(set(kwargs) - set(_ALLOWED_KWARGS[name]))
    if unknown:
        raise ValueError(f"unknown keyword arguments {unknown} for toy dataset {name!r}; "
                         f"expected a subset of {list(_ALLOWED_KWARGS[name])}")
    if name in ("ring8", "grid25"):
        mixture = _ring_mixture(**kwargs) if name == "ring8" else _grid_mixture(**kwargs)
        return ToyDataset2D(name=name, sampler=mixture.sample, mixture=mixture)
    if name == "checkerboard":
        return ToyDataset2D(name=name, sampler=_checkerboard_sampler(**kwargs), mixture=None)
    return ToyDataset2D(name=name, sampler=_moons_sampler(**kwargs), mixture=None)


def assign_modes(x: Tensor, mixture: GaussianMixture2D, max_sigmas: float = 3.0) -> Tensor:
    """Index of the nearest mixture mean for each point of x (N, 2); returns (N,) long.

    A point gets -1 (outlier) when its distance to every mean exceeds ``max_sigmas * mixture.std``, or when it
    is not finite. Note that an exact sample from a 2-D isotropic Gaussian is farther than 3 std from its mean
    with probability exp(-4.5) ~= 1.1%.
    """
    if not isinstance(mixture, GaussianMixture2D):
        raise ValueError(f"mixture must be a GaussianMixture2D, got {type(mixture).__name__}")
    max_sigmas = _positive_float(max_sigmas, "max_sigmas")
    if not torch.is_tensor(x):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"x must be a (N, 2) tensor, got {type(x).__name__}") from None
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x must have shape (N, 2), got shape {tuple(x.shape)}")
    x = x.detach().to(dtype=torch.float64, device="cpu")
    num_points = x.shape[0]
    result = torch.full((num_points,), -1, dtype=torch.long)
    chunk = 65536
    for start in range(0, num_points, chunk):
        block = x[start:start + chunk]
        dist = torch.sqrt(((block[:, None, :] - mixture.means[None, :, :]) ** 2).sum(-1))  # (n, K)
        finite = torch.isfinite(block).all(dim=1)
        dist = torch.where(finite[:, None], dist, torch.full_like(dist, math.inf))
        min_dist, nearest = dist.min(dim=1)
        inside = finite & (min_dist <= max_sigmas * mixture.std)
        result[start:start + chunk] = torch.where(inside, nearest, torch.full_like(nearest, -1))
    return result
