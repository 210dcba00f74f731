"""Any Gaussian diffusion model (ε-, v-, x0-prediction or EDM-preconditioned) as a π-Flow teacher.

A diffusion state x_t = α_t·x0 + s_t·ε is, after dividing by α_t + s_t, the flow state
x_σ = (1 − σ)·x0 + σ·ε at σ = s_t/(α_t + s_t) (docs/algorithm.md, "Diffusion teachers"). `DiffusionTeacher` takes a
flow state (x_σ, σ), finds the model timestep t with σ_t = σ, evaluates the network at x_t = (α_t + s_t)·x_σ and t,
turns its output into (x̂0, ε̂) and returns the flow velocity u = ε̂ − x̂0.

Schedules (`NoiseSchedule`): `DiscreteVPSchedule` (DDPM-style β tables as in the diffusers schedulers, fractional
timesteps by log-SNR interpolation), `CosineVPSchedule` (continuous, Nichol & Dhariwal) and `EDMSchedule`
(x_t = x0 + σ_edm·ε). Core module: never imports diffusers (`DiscreteVPSchedule.from_diffusers_config` only reads a
scheduler's `.config` mapping or a plain dict).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from piflow.checks import SigmaLike, as_batch_sigma, check_finite

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "edm")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TimestepInput = Union[str, float]


def _f64(t: Union[Tensor, float, Sequence[float]]) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64) if not torch.is_tensor(t) else t.to(torch.float64)


def sigma_from_alpha_s(alpha: Tensor, s: Tensor) -> Tensor:
    """σ = s/(α + s): the flow noise level of the diffusion state α·x0 + s·ε."""
    return s / (alpha + s)


def log_snr_from_sigma(sigma: Tensor) -> Tensor:
    """λ = log(α²/s²) = 2·log((1 − σ)/σ) (+inf at σ = 0, −inf at σ = 1)."""
    return 2 * (torch.log1p(-sigma) - torch.log(sigma))


def vp_alpha_s_from_sigma(sigma: Tensor) -> Tuple[Tensor, Tensor]:
    """(α, s) of the variance-preserving (α² + s² = 1) state at flow noise level σ."""
    norm = torch.sqrt((1 - sigma).square() + sigma.square())
    return (1 - sigma) / norm, sigma / norm


class NoiseSchedule:
    """A diffusion noise schedule x_t = α_t·x0 + s_t·ε over the model's time variable t.

    Subclasses implement `alpha_s(t) -> (α, s)` (float64 tensors) and `timestep_of(sigma) -> t`, and set `t_min`,
    `t_max`, the trained range of t (σ increases with t). Attributes: `prediction_type` (from a config, else None),
    `timestep_inputs`, the `timestep_input` strings a `DiffusionTeacher` may use with this schedule.
    """

    t_min: float
    t_max: float
    prediction_type: Optional[str] = None
    timestep_inputs: Tuple[str, ...] = ("t",)
    default_timestep_input: str = "t"

    def alpha_s(self, t: Union[Tensor, float]) -> Tuple[Tensor, Tensor]:
        raise NotImplementedError

    def timestep_of(self, sigma: Union[Tensor, float]) -> Tensor:
        """The t in [t_min, t_max] with sigma_of(t) = σ, for σ in [sigma_min, sigma_max] (float64)."""
        raise NotImplementedError

    def sigma_of(self, t: Union[Tensor, float]) -> Tensor:
        """σ(t) = s_t/(α_t + s_t), float64, increasing in t."""
        alpha, s = self.alpha_s(t)
        return sigma_from_alpha_s(alpha, s)

    @property
    def sigma_min(self) -> float:
        """The lowest flow noise level the model was trained at (σ at t_min)."""
        return float(self.sigma_of(self.t_min))

    @property
    def sigma_max(self) -> float:
        """The highest flow noise level the model was trained at (σ at t_max; 1 only with zero terminal SNR)."""
        return float(self.sigma_of(self.t_max))


# ---------------------------------------------------------------------------------------------------- discrete VP


def _cosine_alpha_bar(t: float, offset: float = 0.008) -> float:
    return math.cos((t + offset) / (1 + offset) * math.pi / 2) ** 2


def make_betas(num_train_timesteps: int, beta_start: float = 0.0001, beta_end: float = 0.02,
               beta_schedule: str = "linear") -> Tensor:
    """The β table of a DDPM-style model, float64 (the diffusers scheduler formulas, computed in float64).

    linear: evenly spaced from beta_start to beta_end; scaled_linear (Stable Diffusion): evenly spaced square roots,
    squared; squaredcos_cap_v2: β_i = min(1 − ᾱ(t_{i+1})/ᾱ(t_i), 0.999) with ᾱ(t) = cos²((t + 0.008)/1.008·π/2),
    t_i = i/T (Nichol & Dhariwal; beta_start/beta_end unused).
    """
    if not (isinstance(num_train_timesteps, int) and not isinstance(num_train_timesteps, bool)
            and num_train_timesteps >= 2):
        raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
    if beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=torch.float64) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = torch.tensor([min(1 - _cosine_alpha_bar((i + 1) / num_train_timesteps)
                                  / _cosine_alpha_bar(i / num_train_timesteps), 0.999)
                              for i in range(num_train_timesteps)], dtype=torch.float64)
    else:
        raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {beta_schedule!r}")
    return betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Zero-terminal-SNR rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Alg. 1): shift √ᾱ_t so the last is 0, then scale it so the first is unchanged; returns the new β (float64; the
    last β is 1)."""
    root = torch.cumprod(1 - _f64(betas), 0).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    alpha_bar = root.square()
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


class DiscreteVPSchedule(NoiseSchedule):
    """A discrete-time variance-preserving schedule: ᾱ_t = Π_{i≤t}(1 − β_i), α = √ᾱ, s = √(1 − ᾱ),
    integer timesteps t = 0 … T − 1 (the diffusers DDPM/DDIM/Euler convention; the network takes t itself).

    Between integer timesteps the log-SNR λ = log(α²/s²) is interpolated linearly in t (equivalently log σ_k with
    σ_k = s/α, as diffusers' `EulerDiscreteScheduler` does), so fractional timesteps map monotonically to σ and
    `timestep_of` inverts `sigma_of` exactly up to round-off. A segment with an infinite end (the last one under
    zero terminal SNR, λ = −∞) is interpolated linearly in σ instead. The trained range is t ∈ [0, T − 1];
    σ_max = σ(T − 1) ≈ 0.93 for Stable Diffusion's schedule, 1 with zero terminal SNR.

    Args:
        betas: (T,) β table, every β in (0, 1) (the last may be 1: zero terminal SNR), or use `from_betas` /
            `from_diffusers_config`.
        prediction_type: optional, what the model this schedule came with predicts (from a diffusers config).
        timestep_spacing: optional, the inference spacing of the config ("leading", "trailing", "linspace"): kept for
            documentation only — a π-Flow teacher is queried at the σ the student asks for, not on a fixed grid.
    """

    def __init__(self, betas: Union[Tensor, Sequence[float]], prediction_type: Optional[str] = None,
                 timestep_spacing: Optional[str] = None):
        betas = _f64(betas).reshape(-1).clone()
        if betas.numel() < 2:
            raise ValueError(f"betas must hold at least 2 values (one per training timestep), got {betas.numel()}")
        inner, last = betas[:-1], betas[-1]
        if not bool(torch.isfinite(betas).all()) or bool(((inner <= 0) | (inner >= 1)).any()) \
                or not 0 < float(last) <= 1:
            raise ValueError("betas must lie in (0, 1) (the last may be 1: zero terminal SNR), got values in "
                             f"[{float(betas.min())}, {float(betas.max())}]")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.num_train_timesteps = betas.numel()
        self.prediction_type = prediction_type
        self.timestep_spacing = timestep_spacing
        self.t_min, self.t_max = 0.0, float(self.num_train_timesteps - 1)
        alpha = self.alphas_cumprod.sqrt()
        s = (1 - self.alphas_cumprod).sqrt()
        self._alpha, self._s = alpha, s
        self._sigmas = sigma_from_alpha_s(alpha, s)                  # increasing in t
        if not bool((self._sigmas[1:] > self._sigmas[:-1]).all()):
            raise ValueError("betas must give strictly increasing noise levels (every β > 0)")
        self._log_snr = 2 * (torch.log(alpha) - torch.log(s))      # decreasing; −inf where α = 0

    @classmethod
    def from_betas(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                   beta_schedule: str = "linear", rescale_betas_zero_snr: bool = False,
                   prediction_type: Optional[str] = None,
                   timestep_spacing: Optional[str] = None) -> "DiscreteVPSchedule":
        """The schedule of a β recipe (see `make_betas`), optionally rescaled to zero terminal SNR."""
        betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(f"beta_start/beta_end must give betas in (0, 1), got beta_start={beta_start}, "
                             f"beta_end={beta_end}")
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas, prediction_type=prediction_type, timestep_spacing=timestep_spacing)

    @classmethod
    def from_diffusers_config(cls, config: Any) -> "DiscreteVPSchedule":
        """From a diffusers scheduler (DDPM, DDIM, Euler discrete, …) or its config dict.

        Reads num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, prediction_type,
        rescale_betas_zero_snr and timestep_spacing (missing keys take DDPMScheduler's defaults). Inference-only
        settings (use_karras_sigmas, steps_offset, …) do not change the trained schedule and are ignored.
        """
        if not isinstance(config, Mapping):
            config = getattr(config, "config", None)
            if not isinstance(config, Mapping):
                raise ValueError("from_diffusers_config needs a diffusers scheduler or its config dict")
        config = dict(config)
        steps = config.get("num_train_timesteps", 1000)
        prediction_type = config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        trained = config.get("trained_betas")
        if trained is not None:
            betas = _f64(list(trained) if not torch.is_tensor(trained) else trained).reshape(-1)
            if betas.numel() != steps:
                raise ValueError(f"trained_betas has {betas.numel()} values but num_train_timesteps is {steps}")
            if config.get("rescale_betas_zero_snr", False):
                betas = rescale_zero_terminal_snr(betas)
            return cls(betas, prediction_type, config.get("timestep_spacing"))
        return cls.from_betas(steps, config.get("beta_start", 0.0001), config.get("beta_end", 0.02),
                              config.get("beta_schedule", "linear"), bool(config.get("rescale_betas_zero_snr", False)),
                              prediction_type, config.get("timestep_spacing"))

    def alpha_s(self, t: Union[Tensor, float]) -> Tuple[Tensor, Tensor]:
        """(α_t, s_t) at (fractional) timesteps t ∈ [0, T − 1] (float64; exact table values at integers)."""
        t = _f64(t).clamp(self.t_min, self.t_max)
        lower = t.floor().clamp(max=self.t_max - 1).long()
        frac = t - lower
        upper = lower + 1
        lam0, lam1 = self._log_snr[lower], self._log_snr[upper]
        finite = torch.isfinite(lam1)
        lam = torch.where(finite, lam0 + frac * (torch.where(finite, lam1, lam0) - lam0), lam0)
        sigma_lam = torch.sigmoid(-lam / 2)                          # σ = 1/(1 + e^{λ/2})
        sigma_lin = self._sigmas[lower] + frac * (self._sigmas[upper] - self._sigmas[lower])
        sigma = torch.where(finite, sigma_lam, sigma_lin)
        alpha, s = vp_alpha_s_from_sigma(sigma)
        exact = frac == 0                                            # table values at integer timesteps
        alpha = torch.where(exact, self._alpha[lower], alpha)
        s = torch.where(exact, self._s[lower], s)
        at_end = t == self.t_max
        alpha = torch.where(at_end, self._alpha[-1], alpha)
        s = torch.where(at_end, self._s[-1], s)
        return alpha, s

    def timestep_of(self, sigma: Union[Tensor, float]) -> Tensor:
        """The fractional timestep of flow noise level σ (clamped to [sigma_min, sigma_max]), float64."""
        sigma = _f64(sigma).clamp(float(self._sigmas[0]), float(self._sigmas[-1]))
        upper = torch.searchsorted(self._sigmas, sigma.contiguous()).clamp(1, self.num_train_timesteps - 1)
        lower = upper - 1
        lam0, lam1 = self._log_snr[lower], self._log_snr[upper]
        finite = torch.isfinite(lam1)
        lam = log_snr_from_sigma(sigma)
        frac_lam = (lam - lam0) / torch.where(finite, lam1 - lam0, torch.ones_like(lam0))
        frac_lin = (sigma - self._sigmas[lower]) / (self._sigmas[upper] - self._sigmas[lower])
        frac = torch.where(finite, frac_lam, frac_lin).clamp(0, 1)
        return lower.to(torch.float64) + frac


# ---------------------------------------------------------------------------------------------------- cosine VP


class CosineVPSchedule(NoiseSchedule):
    """Continuous cosine schedule (Nichol & Dhariwal 2021): ᾱ(t) = f(t)/f(0), f(t) = cos²((t + o)/(1 + o)·π/2),
    t ∈ [t_min, t_max] ⊂ [0, 1], α = √ᾱ, s = √(1 − ᾱ). At t = 1, α = 0 exactly (σ = 1); at t = 0, σ = 0.

    The network's time input is t itself (`timestep_input="t"`) or a multiple of it (a float: e.g. 1000.0 for a
    network trained on 1000·t).
    """

    def __init__(self, offset: float = 0.008, t_min: float = 0.0, t_max: float = 1.0,
                 prediction_type: Optional[str] = None):
        if not (math.isfinite(offset) and offset > 0):
            raise ValueError(f"offset must be a finite positive number, got {offset!r}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ValueError(f"t_min/t_max must satisfy 0 <= t_min < t_max <= 1, got ({t_min}, {t_max})")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.offset, self.t_min, self.t_max = float(offset), float(t_min), float(t_max)
        self.prediction_type = prediction_type
        self._scale = math.cos(self.offset / (1 + self.offset) * math.pi / 2)   # √f(0)

    def alpha_s(self, t: Union[Tensor, float]) -> Tuple[Tensor, Tensor]:
        t = _f64(t).clamp(self.t_min, self.t_max)
        # cos((t + o)/(1 + o)·π/2) = sin((1 − t)/(1 + o)·π/2): exactly 0 at t = 1
        alpha = torch.sin((1 - t) / (1 + self.offset) * (math.pi / 2)) / self._scale
        alpha = alpha.clamp(0, 1)
        return alpha, torch.sqrt((1 - alpha.square()).clamp(min=0))

    def timestep_of(self, sigma: Union[Tensor, float]) -> Tensor:
        sigma = _f64(sigma).clamp(self.sigma_min, self.sigma_max)
        alpha, _ = vp_alpha_s_from_sigma(sigma)
        t = 1 - (1 + self.offset) * (2 / math.pi) * torch.asin((alpha * self._scale).clamp(0, 1))
        return t.clamp(self.t_min, self.t_max)


# ---------------------------------------------------------------------------------------------------- EDM


class EDMSchedule(NoiseSchedule):
    """EDM (Karras et al. 2022): x_t = x0 + σ_edm·ε, i.e. α = 1, s = σ_edm = t, σ_edm ∈ [sigma_min_edm,
    sigma_max_edm] (defaults 0.002, 80), flow σ = σ_edm/(1 + σ_edm) (σ_edm = 80 → σ ≈ 0.988; σ = 1 is never
    reachable). The schedule's t is σ_edm; the network's time input is σ_edm (`timestep_input="t"`) or
    c_noise = ¼·ln σ_edm (`"c_noise"`, EDM's preconditioning, the default for prediction_type "edm").
    `sigma_data` is the data std of EDM's preconditioning (c_skip, c_out, c_in).
    """

    timestep_inputs = ("t", "c_noise")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5,
                 prediction_type: Optional[str] = None):
        if not (math.isfinite(sigma_min) and math.isfinite(sigma_max) and 0 < sigma_min < sigma_max):
            raise ValueError(f"sigma_min/sigma_max must satisfy 0 < sigma_min < sigma_max < inf, "
                             f"got ({sigma_min}, {sigma_max})")
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be a finite positive number, got {sigma_data!r}")
        if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        self.t_min, self.t_max = float(sigma_min), float(sigma_max)
        self.sigma_data = float(sigma_data)
        self.prediction_type = prediction_type

    def alpha_s(self, t: Union[Tensor, float]) -> Tuple[Tensor, Tensor]:
        t = _f64(t).clamp(self.t_min, self.t_max)
        return torch.ones_like(t), t

    def timestep_of(self, sigma: Union[Tensor, float]) -> Tensor:
        sigma = _f64(sigma).clamp(self.sigma_min, self.sigma_max)
        return (sigma / (1 - sigma)).clamp(self.t_min, self.t_max)

    def preconditioning(self, sigma_edm: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """EDM's (c_skip, c_out, c_in) at σ_edm: D = c_skip·x + c_out·F(c_in·x; c_noise)."""
        sd2 = self.sigma_data ** 2
        total = sigma_edm.square() + sd2
        return sd2 / total, sigma_edm * self.sigma_data / total.sqrt(), 1 / total.sqrt()


# ---------------------------------------------------------------------------------------------------- the teacher


def _unwrap_output(out: Any) -> Tensor:
    if torch.is_tensor(out):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"the model must return a tensor, a diffusers output with .sample or a tuple, got {type(out)}")


class DiffusionTeacher:
    """A diffusion network as a σ-space π-Flow teacher ``teacher(x_σ, σ, cond) -> u = ε̂ − x̂0``.

    Args:
        model: called as ``model(x_t, t_in)`` (cond None), ``model(x_t, t_in, cond)`` (a tensor cond, e.g. class
            labels or text embeddings as diffusers' UNets take them positionally) or ``model(x_t, t_in, **cond)``
            (a dict cond, e.g. ``{"encoder_hidden_states": …, "added_cond_kwargs": …}``); may return a tensor, a
            diffusers output (``.sample``) or a tuple. t_in is a float32 (B,) tensor (fractional timesteps).
        schedule: the model's `NoiseSchedule`.
        prediction_type: "epsilon", "v_prediction" (v = α·ε − s·x0), "sample" (x0) or "edm" (the raw EDM network F:
            the teacher applies c_in to the input, c_skip/c_out to the output; needs an `EDMSchedule`). None: the
            schedule's (from its diffusers config). A model that already applies EDM's preconditioning, D(x; σ_edm)
            with x = x0 + σ_edm·ε, is prediction_type "sample" with an `EDMSchedule`.
        out_channels: keep the first C output channels (drops learned-variance channels, e.g. DiT-XL/2's 2C).
        timestep_input: what the network gets as time: "t" (the schedule's t: the fractional timestep of a
            `DiscreteVPSchedule`, t ∈ [0, 1] of a `CosineVPSchedule`, σ_edm of an `EDMSchedule`), a float k
            (k·t), or "c_noise" (¼·ln σ_edm, `EDMSchedule` only). None: "c_noise" for "edm", else "t".

    Noise levels outside the trained range [schedule.sigma_min, schedule.sigma_max] are clamped to the nearest
    trained level (the state x_σ is treated as if it were at that level), with one warning per teacher: a VP model
    without zero terminal SNR never saw σ = 1 (Stable Diffusion's last timestep is σ ≈ 0.93), and no VP table reaches
    σ = 0. With zero terminal SNR, σ = 1 (α = 0) is in range and only v- (or x0-) prediction defines x̂0 there;
    ε-prediction at α = 0 raises. The σ → t map and the conversion coefficients are computed in float64 (from σ in
    whatever precision it is given), applied in float32; the model runs in the dtype of x. Frozen: `__call__` puts
    an nn.Module model in eval mode and runs without grad; `network_inputs` / `velocity_from_output` (for students
    that share the network) are differentiable.
    """

    def __init__(self, model: Callable[..., Any], schedule: NoiseSchedule, prediction_type: Optional[str] = None, *,
                 out_channels: Optional[int] = None, timestep_input: Optional[TimestepInput] = None):
        if not isinstance(schedule, NoiseSchedule):
            raise ValueError(f"schedule must be a NoiseSchedule (DiscreteVPSchedule, CosineVPSchedule, EDMSchedule), "
                             f"got {type(schedule).__name__}")
        if prediction_type is None:
            prediction_type = schedule.prediction_type
            if prediction_type is None:
                raise ValueError("prediction_type is required (the schedule has none from a config)")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if prediction_type == "edm" and not isinstance(schedule, EDMSchedule):
            raise ValueError("prediction_type 'edm' needs an EDMSchedule (for sigma_data and σ_edm)")
        if out_channels is not None and (not isinstance(out_channels, int) or isinstance(out_channels, bool)
                                         or out_channels < 1):
            raise ValueError(f"out_channels must be a positive int or None, got {out_channels!r}")
        if timestep_input is None:
            timestep_input = "c_noise" if prediction_type == "edm" else "t"
        if isinstance(timestep_input, str):
            if timestep_input not in schedule.timestep_inputs:
                raise ValueError(f"timestep_input must be one of {', '.join(schedule.timestep_inputs)} or a positive "
                                 f"float for {type(schedule).__name__}, got {timestep_input!r}")
        elif isinstance(timestep_input, bool) or not isinstance(timestep_input, (int, float)) \
                or not (math.isfinite(timestep_input) and timestep_input > 0):
            raise ValueError(f"timestep_input must be 't', 'c_noise' or a positive float, got {timestep_input!r}")
        config_steps = _config_get(model, "num_train_timesteps")
        if config_steps is not None and isinstance(schedule, DiscreteVPSchedule) \
                and int(config_steps) != schedule.num_train_timesteps:
            raise ValueError(f"num_train_timesteps: the schedule has {schedule.num_train_timesteps} timesteps but the "
                             f"model's config says {config_steps}")
        self.model, self.schedule, self.prediction_type = model, schedule, prediction_type
        self.out_channels, self.timestep_input = out_channels, timestep_input
        self._warned = False

    # -- time ------------------------------------------------------------------------------------------------------

    def _clamp(self, sigma: Tensor) -> Tensor:
        low, high = self.schedule.sigma_min, self.schedule.sigma_max
        outside = (sigma < low - 1e-12) | (sigma > high + 1e-12)
        if bool(outside.any()) and not self._warned:
            self._warned = True
            bad = sigma[outside]
            warnings.warn(f"DiffusionTeacher: σ outside the trained range [{low:.6g}, {high:.6g}] (e.g. "
                          f"{float(bad.reshape(-1)[0]):.6g}) clamped to the nearest trained level (warned once)",
                          stacklevel=3)
        return sigma.clamp(low, high)

    def _time_in(self, t: Tensor) -> Tensor:
        if self.timestep_input == "t":
            return t
        if self.timestep_input == "c_noise":
            return 0.25 * torch.log(t)
        return t * float(self.timestep_input)

    def _time_from_input(self, t_in: Tensor) -> Tensor:
        t_in = t_in.to(torch.float64)
        if self.timestep_input == "t":
            return t_in
        if self.timestep_input == "c_noise":
            return torch.exp(4 * t_in)
        return t_in / float(self.timestep_input)

    def _times(self, x_sigma: Tensor, sigma: SigmaLike) -> Tuple[Tensor, Tensor, Tensor]:
        """(t (B,), α, s (B, 1, …)) in float64 on the CPU (schedule tables live there; float64 works on every
        backend there) at the (clamped) noise levels."""
        if torch.is_tensor(sigma):
            sigma = sigma.detach().cpu()
        sigma = as_batch_sigma(sigma, x_sigma.shape[0], x_sigma.dim(), torch.device("cpu"), name="sigma",
                               dtype=torch.float64)
        sigma = self._clamp(sigma)
        t = self.schedule.timestep_of(sigma.reshape(-1))
        alpha, s = self.schedule.alpha_s(t)
        shape = (x_sigma.shape[0], *([1] * (x_sigma.dim() - 1)))
        return t, alpha.reshape(shape), s.reshape(shape)

    # -- conversion ------------------------------------------------------------------------------------------------

    def _coefficients(self, alpha: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """(a, b) with u = a·x_t + b·out (out: the model's output after any EDM output scaling), float64."""
        kind = self.prediction_type
        if kind == "epsilon":
            if bool((alpha <= 0).any()):
                raise ValueError("prediction_type 'epsilon' cannot give x0 at α = 0 (σ = 1, zero terminal SNR); "
                                 "use a v_prediction model or keep σ below 1")
            # x̂0 = (x_t − s ε̂)/α, u = ε̂ − x̂0
            return -1 / alpha, (alpha + s) / alpha
        if kind == "v_prediction":
            # [x_t; v] = [[α, s], [−s, α]]·[x0; ε]  ⇒  x̂0 = (α x_t − s v)/(α²+s²), ε̂ = (s x_t + α v)/(α²+s²)
            norm = alpha.square() + s.square()
            return (s - alpha) / norm, (alpha + s) / norm
        # "sample" and "edm" (after D = c_skip x + c_out F): x̂0 = out, ε̂ = (x_t − α x̂0)/s
        if bool((s <= 0).any()):
            raise ValueError(f"prediction_type {kind!r} cannot give ε at s = 0 (σ = 0); keep σ above 0")
        return 1 / s, -(alpha + s) / s

    def network_inputs(self, x_sigma: Tensor, sigma: SigmaLike) -> Tuple[Tensor, Tensor]:
        """(x_in, t_in): what the network is evaluated at for the flow state (x_σ, σ): x_in = (α_t + s_t)·x_σ (times
        c_in for "edm") in the dtype of x_σ, t_in the network's time input (float32, (B,))."""
        t, alpha, s = self._times(x_sigma, sigma)
        return self._inputs(x_sigma, t, alpha, s)

    def _inputs(self, x_sigma: Tensor, t: Tensor, alpha: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        scale = alpha + s
        if self.prediction_type == "edm":
            scale = scale * self.schedule.preconditioning(s)[2]
        x_in = (x_sigma.float() * scale.float().to(x_sigma.device)).to(x_sigma.dtype)
        return x_in, self._time_in(t).float().to(x_sigma.device)

    def velocity_from_output(self, out: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """u from the network output `out` at the inputs (x_t, t) = `network_inputs(...)` (float32 result)."""
        t64 = self._time_from_input(t.detach().reshape(-1).cpu())
        alpha, s = self.schedule.alpha_s(t64)
        shape = (x_t.shape[0], *([1] * (x_t.dim() - 1)))
        alpha, s = alpha.reshape(shape), s.reshape(shape)
        x_state = x_t.float()
        if self.prediction_type == "edm":
            x_state = x_state / self.schedule.preconditioning(s)[2].float().to(x_t.device)
        return self._velocity(out, x_state, alpha, s)

    def _affine(self, alpha: Tensor, s: Tensor) -> Tuple[Tensor, Tensor]:
        """(a, b) with u = a·x_t + b·(the network's raw output), float64: `_coefficients` with EDM's output scaling
        folded in."""
        a, b = self._coefficients(alpha, s)
        if self.prediction_type == "edm":
            c_skip, c_out, _ = self.schedule.preconditioning(s)
            # u = a·x_t + b·(c_skip·x_t + c_out·F)
            a, b = a + b * c_skip, b * c_out
        return a, b

    def output_scale(self, t: Tensor) -> Tensor:
        """(B,) float32 on the CPU: b of u = a·x_t + b·out at the network time inputs `t` — how the network's
        output units scale into velocity units (a student's output-space stds times |b| are velocity stds)."""
        alpha, s = self.schedule.alpha_s(self._time_from_input(t.detach().reshape(-1).cpu()))
        return self._affine(alpha, s)[1].float()

    def component_velocities(self, outputs: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """(B, N, C, …) outputs of a policy head — N GM component means or DX nodes, each in the network's output
        units, all at the inputs (x_t (B, C, …), t (B,)) = `network_inputs(...)` — → their velocities
        a·out_k + b·x_t, float32, shaped like `outputs`: how a diffusion network's policy students map their heads."""
        batch, num = outputs.shape[:2]
        flat = outputs.reshape(batch * num, *outputs.shape[2:])
        u = self.velocity_from_output(flat, x_t.repeat_interleave(num, dim=0), t.reshape(-1).repeat_interleave(num))
        return u.reshape(outputs.shape)

    def velocity_logstds(self, logstds: Tensor, t: Tensor) -> Tensor:
        """Per-sample GM log-stds (B, …) in the network's output units → velocity units at network time inputs `t`
        (B,): + log|b| (u = a·x_t + b·out pushes the output-space mixture forward, every std times |b|)."""
        scale = self.output_scale(t).abs().log().to(logstds.device, logstds.dtype)
        return logstds + scale.reshape(-1, *([1] * (logstds.dim() - 1)))

    def _velocity(self, out: Tensor, x_t: Tensor, alpha: Tensor, s: Tensor) -> Tensor:
        """u = a·x_t + b·out from float64 CPU (α, s); the arithmetic on the tensors is float32 on their device."""
        out = self._select_channels(out, x_t).float()
        x_t = x_t.float()
        device = x_t.device
        a, b = self._affine(alpha, s)
        return a.float().to(device) * x_t + b.float().to(device) * out

    def _select_channels(self, out: Tensor, x_t: Tensor) -> Tensor:
        channels = x_t.shape[1] if x_t.dim() > 1 else None
        if self.out_channels is not None:
            if out.dim() < 2 or out.shape[1] < self.out_channels:
                raise ValueError(f"out_channels={self.out_channels} but the model returned shape {tuple(out.shape)}")
            out = out[:, :self.out_channels]
        if out.shape != x_t.shape:
            hint = (f"; pass out_channels={channels} to keep the first {channels} (learned-variance models)"
                    if channels is not None and out.dim() == x_t.dim() and out.shape[1] > channels else "")
            raise ValueError(f"the model output has shape {tuple(out.shape)}, expected {tuple(x_t.shape)}{hint}")
        return out

    # -- training and sharing -------------------------------------------------------------------------------------

    def without_model(self) -> "DiffusionTeacher":
        """The same conversion with no network attached: what a student that runs its own copy of the network keeps
        (`network_inputs`, `velocity_from_output`, `output_scale`), so that copying the student (EMA) never copies
        the teacher's weights."""
        return self.with_model(None)

    def with_model(self, model: Optional[Callable[..., Any]]) -> "DiffusionTeacher":
        """This conversion (schedule, prediction type, kept channels, time input) around `model`."""
        return DiffusionTeacher(model, self.schedule, self.prediction_type, out_channels=self.out_channels,
                                timestep_input=self.timestep_input)

    def training_example(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """(x_in, t_in, target) of the denoising objective at model times `t` (B,) of the schedule: the network
        input x_t = α_t·x0 + s_t·ε, its time input and what it should output (ε, v = α·ε − s·x0 or x0), so that a
        network trained on ‖model(x_in, t_in) − target‖² is the network this teacher converts. Float32, on the
        device of x0; "edm" (raw F of a preconditioned network) is not offered."""
        if self.prediction_type == "edm":
            raise ValueError("training_example: prediction_type 'edm' is not a training target piflow offers; use "
                             "epsilon, v_prediction or sample")
        if x0.shape != noise.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}, got {tuple(noise.shape)}")
        alpha, s = self.schedule.alpha_s(t.detach().reshape(-1).cpu().to(torch.float64))
        shape = (x0.shape[0], *([1] * (x0.dim() - 1)))
        alpha = alpha.reshape(shape).float().to(x0.device)
        s = s.reshape(shape).float().to(x0.device)
        x0, noise = x0.float(), noise.float()
        x_t = alpha * x0 + s * noise
        target = {"epsilon": noise, "v_prediction": alpha * noise - s * x0, "sample": x0}[self.prediction_type]
        return x_t, self._time_in(t.reshape(-1).to(torch.float64)).float().to(x0.device), target

    # -- the teacher -----------------------------------------------------------------------------------------------

    def _call_model(self, x_in: Tensor, t_in: Tensor, cond: Any) -> Tensor:
        if cond is None:
            out = self.model(x_in, t_in)
        elif isinstance(cond, dict):
            out = self.model(x_in, t_in, **cond)
        else:
            out = self.model(x_in, t_in, cond)
        return _unwrap_output(out)

    @torch.no_grad()
    def __call__(self, x_sigma: Tensor, sigma_t: SigmaLike, cond: Any = None) -> Tensor:
        """u = ε̂ − x̂0 at the flow state (x_σ (B, …), σ (B,) or a float), in the dtype of x_σ."""
        if x_sigma.dim() < 1:
            raise ValueError("x_sigma must have a batch dimension")
        check_finite(x_sigma, "x_sigma")
        if isinstance(self.model, torch.nn.Module):
            self.model.eval()
        t, alpha, s = self._times(x_sigma, sigma_t)
        self._coefficients(alpha, s)                                  # refuse undefined conversions before the call
        x_in, t_in = self._inputs(x_sigma, t, alpha, s)
        out = self._call_model(x_in, t_in, cond)
        x_state = x_sigma.float() * (alpha + s).float().to(x_sigma.device)
        return self._velocity(out, x_state, alpha, s).to(x_sigma.dtype)


def _config_get(model: Any, key: str) -> Any:
    config = getattr(model, "config", None)
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None) if config is not None else None
