"""GMFlow policy: a Gaussian mixture over x0 whose closed-form posterior mean gives the velocity anywhere below σ_src.

The network predicts, at (x_src, σ_src), a u-space Gaussian mixture per "GM chunk" (one C-vector per latent pixel):
K means, per-pixel log-weights shared over channels, and one isotropic log-std per sample. Converted once to x0-space
(μ_k = x_src − σ_src·μ_u,k, shared variance v = s²σ_src²), the posterior q(x0 | x_t) for any later state x_t on the
Markov chain x0 → x_t → x_src is again a Gaussian mixture in closed form (algorithm.md §2.2):

    ρ = α/σ,  ζ = ρ_t² − ρ_s²,  ν = ρ_t·x_t/σ_t − ρ_s·x_src/σ_src,  D = max(v·ζ + 1, eps)
    a'_k = a_k + (Σ_c μ_k,c ν_c − ½ ζ Σ_c μ_k,c²)/D,   x̂0 = Σ_k softmax(a')_k (μ_k + v ν)/D = (Σ_k w_k μ_k + v ν)/D.

The last form (Σ_k w_k = 1) needs only two contractions over K per evaluation; Σ_c μ_k,c² is computed once.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from piflow.checks import as_batch_sigma, check_finite, check_state, draw
from piflow.policies.base import Policy


def gm_posterior_x0(means: Tensor, means_sq: Tensor, logits: Tensor, var: Tensor, zeta: Tensor, nu: Tensor,
                    eps: float) -> Tensor:
    """Posterior mean of the x0-space GM given the extra Gaussian evidence exp(−½ζ|x0|² + ν·x0).

    means (B, K, C, *S), means_sq = Σ_c means² (B, K, 1, *S), logits (B, K, 1, *S), var/zeta (B, 1, 1, …),
    nu (B, C, *S). Returns x̂0 (B, C, *S).
    """
    denom = (var.squeeze(1) * zeta.squeeze(1) + 1).clamp(min=eps)             # (B, 1, …)
    dot = (means * nu.unsqueeze(1)).sum(dim=2, keepdim=True)                   # (B, K, 1, *S)
    post_logits = logits + (dot - 0.5 * zeta * means_sq) / denom.unsqueeze(1)
    weights = torch.softmax(post_logits, dim=1)
    mixture_mean = (weights * means).sum(dim=1)                                # (B, C, *S)
    return (mixture_mean + var.squeeze(1) * nu) / denom


def gm_evidence(x_t: Tensor, sigma_t: Tensor, x_src: Tensor, sigma_src: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """ζ (B, 1, 1, …) and ν (B, C, *S) of the likelihood ratio N(x_t; α_t x0, σ_t²)/N(x_src; α_s x0, σ_s²)."""
    sigma_t = sigma_t.clamp(min=eps)
    sigma_s = sigma_src.clamp(min=eps)
    rho_t = (1 - sigma_t) / sigma_t
    rho_s = (1 - sigma_s) / sigma_s
    zeta = (rho_t.square() - rho_s.square()).unsqueeze(1)
    nu = rho_t / sigma_t * x_t - rho_s / sigma_s * x_src
    return zeta, nu


def gm_euler_substep(x: Tensor, sigma: Tensor, sigma_next: Tensor, means: Tensor, means_sq: Tensor, logits: Tensor,
                     var: Tensor, x_src: Tensor, sigma_src: Tensor, eps: float) -> Tensor:
    """One Euler substep x + π(x, σ)·(σ_next − σ) of a GMFlow policy (the unit that `torch.compile` fuses on CUDA)."""
    zeta, nu = gm_evidence(x, sigma, x_src, sigma_src, eps)
    x0 = gm_posterior_x0(means, means_sq, logits, var, zeta, nu, eps)
    return x + (x - x0) / sigma.clamp(min=eps) * (sigma_next - sigma)


def gm_substep_coefficients(sigmas: Tensor, var: Tensor, sigma_src: Tensor, eps: float) -> Tensor:
    """Per-(substep, sample) scalars of the fused rollout kernel, (N, B, 6) float32, from σ (N+1, B, 1, …):

    (a, b, d, q, w, h) with ν = a·x − b·x_src, a'_k = a_k + d·μ_k·ν − q·Σμ_k², x̂0 = d·Σ_k w_k μ_k + w·ν and
    x ← x + (x − x̂0)·h: the terms of `gm_evidence`, `gm_posterior_x0` and the Euler step that do not depend on x.
    """
    batch = sigmas.shape[1]
    start, sigma_next = sigmas[:-1].reshape(-1, batch), sigmas[1:].reshape(-1, batch)
    sigma = start.clamp(min=eps)
    sigma_s = sigma_src.reshape(1, batch).clamp(min=eps)
    rho_t, rho_s = (1 - sigma) / sigma, (1 - sigma_s) / sigma_s
    zeta = rho_t.square() - rho_s.square()
    v = var.reshape(1, batch)
    d = 1 / (v * zeta + 1).clamp(min=eps)
    return torch.stack([rho_t / sigma, (rho_s / sigma_s).expand_as(sigma), d, 0.5 * zeta * d, v * d,
                        (sigma_next - start) / sigma], dim=-1)


_fused_enabled = True
_cuda_substep: Optional[Callable[..., Tensor]] = None
_cuda_compile_failed = False


def set_fused_rollout(enabled: bool = True) -> None:
    """Turn the fused GM rollout on (the default) or off (plain PyTorch everywhere, e.g. to compare).

    Fused: on the CPU, a C kernel runs all substeps of a rollout per block of pixels (compiled once per machine
    with the system C compiler, see `piflow.kernels`); on CUDA, each substep is one `torch.compile` kernel
    (compiled once per shape). Where neither can be built, piflow warns once and uses plain PyTorch, which gives
    the same numbers up to float32 round-off. The `piflow` command turns it off when ``PIFLOW_FUSED=0``.
    """
    global _fused_enabled
    _fused_enabled = bool(enabled)


def fused_rollout_enabled() -> bool:
    return _fused_enabled


@contextlib.contextmanager
def fused_rollout(enabled: bool) -> Iterator[None]:
    """`set_fused_rollout(enabled)` inside the block, the previous setting restored after it."""
    previous = _fused_enabled
    set_fused_rollout(enabled)
    try:
        yield
    finally:
        set_fused_rollout(previous)


def _cpu_kernel():
    from piflow.kernels import gm_rollout_library

    return gm_rollout_library()


def _cuda_compiled_substep() -> Optional[Callable[..., Tensor]]:
    global _cuda_substep
    if _cuda_substep is None and not _cuda_compile_failed and hasattr(torch, "compile"):
        _cuda_substep = torch.compile(gm_euler_substep)
    return _cuda_substep


class _RecomputedPosterior(torch.autograd.Function):
    """`gm_posterior_x0` that keeps no intermediates: backward recomputes it under autograd (what
    `torch.utils.checkpoint` does, without its import of torch._dynamo: ~70 MB of resident memory and ~2 s at the
    first backward). Inputs as `gm_posterior_x0`; first-order gradients only."""

    @staticmethod
    def forward(ctx, means, means_sq, logits, var, zeta, nu, eps):
        ctx.save_for_backward(means, means_sq, logits, var, zeta, nu)
        ctx.eps = eps
        return gm_posterior_x0(means, means_sq, logits, var, zeta, nu, eps)

    @staticmethod
    def backward(ctx, grad_out):
        wanted = ctx.needs_input_grad[:6]
        leaves = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, wanted)]
        with torch.enable_grad():
            out = gm_posterior_x0(*leaves, ctx.eps)
            grads = iter(torch.autograd.grad(out, [leaf for leaf, need in zip(leaves, wanted) if need], grad_out,
                                             allow_unused=True))
        return (*(next(grads) if need else None for need in wanted), None)


class _FusedRollout(torch.autograd.Function):
    """The CPU kernel's rollout with a recomputing backward: the forward keeps nothing but its inputs; the
    backward reruns the plain-PyTorch rollout under autograd (posteriors recomputed) and differentiates it."""

    @staticmethod
    def forward(ctx, x, sigmas, means, means_sq, logits, var, x_src, sigma_src, eps, library):
        coefficients = gm_substep_coefficients(sigmas, var, sigma_src, eps)
        from piflow.kernels import gm_rollout_cpu

        ctx.save_for_backward(x, sigmas, means, logits, var, x_src, sigma_src)
        ctx.eps = eps
        return gm_rollout_cpu(library, x, coefficients, means, means_sq, logits, x_src)

    @staticmethod
    def backward(ctx, grad_out):
        x, sigmas, means, logits, var, x_src, sigma_src = ctx.saved_tensors
        wanted = [ctx.needs_input_grad[i] for i in (0, 2, 4, 5, 6)]      # means_sq: recomputed from means
        leaves = [t.detach().requires_grad_(need) for t, need in zip((x, means, logits, var, x_src), wanted)]
        with torch.enable_grad():
            policy = GMFlowPolicy.from_x0(leaves[1], leaves[2], leaves[3], leaves[4], sigma_src, ctx.eps)
            out = Policy.substeps(policy, leaves[0], sigmas)
            inputs = [leaf for leaf, need in zip(leaves, wanted) if need]
            grads = iter(torch.autograd.grad(out, inputs, grad_out, allow_unused=True))
        x_grad, means_grad, logits_grad, var_grad, x_src_grad = (next(grads) if need else None for need in wanted)
        return x_grad, None, means_grad, None, logits_grad, var_grad, x_src_grad, None, None, None


class GMFlowPolicy(Policy):
    """Gaussian-mixture flow policy (algorithm.md §2.2).

    Args:
        means: u-space component means, (B, K, C, *spatial).
        logstds: log of the u-space std s, broadcastable to (B, 1, 1, …) — one scalar per sample.
        logweights: (B, K, 1, *spatial), log-softmaxed over K (one weight vector per GM chunk, shared over C).
        x_src: the state the network saw, (B, C, *spatial).
        sigma_src: its noise level, float or (B,), in (0, 1].
        eps: clamp for σ and for the posterior denominator.
    """

    def __init__(self, means: Tensor, logstds: Tensor, logweights: Tensor, x_src: Tensor, sigma_src,
                 eps: float = 1e-6):
        if means.dim() < 3:
            raise ValueError(f"means must have shape (B, K, C, *spatial), got {tuple(means.shape)}")
        batch, num_components = means.shape[:2]
        state = (batch, *means.shape[2:])
        sigma = check_state(x_src, "x_src", state, sigma_src, "sigma_src",
                            f"shape (B, C, *spatial) = {state} to match means {tuple(means.shape)}")
        expected_lw = (batch, num_components, 1, *means.shape[3:])
        if logweights.shape != expected_lw:
            raise ValueError(f"logweights must have shape (B, K, 1, *spatial) = {expected_lw}, "
                             f"got {tuple(logweights.shape)}")
        if logstds.numel() not in (1, batch):
            raise ValueError(f"logstds must hold one value per sample (shape (B,) or (B, 1, …, 1) with B={batch}), "
                             f"got shape {tuple(logstds.shape)}")
        for tensor, name in ((means, "means"), (logstds, "logstds"), (logweights, "logweights")):
            check_finite(tensor.detach(), name)
        ndim = means.dim()
        if bool((sigma <= 0).any()):
            raise ValueError("sigma_src must be > 0 for a GMFlow policy")
        x_src32 = x_src.float()
        sigma_k = sigma.unsqueeze(1)                                               # (B, 1, 1, …)
        logstd = logstds.float().reshape(-1).expand(batch).reshape(batch, *([1] * (ndim - 1)))
        means_x0 = x_src32.unsqueeze(1) - sigma_k * means.float()
        var = torch.exp(2 * logstd) * sigma_k ** 2
        self._init_x0(means_x0, logweights.float(), var, x_src32, sigma, eps)

    def _init_x0(self, means_x0: Tensor, logits: Tensor, var: Tensor, x_src: Tensor, sigma_src: Tensor,
                 eps: float) -> None:
        self.means = means_x0          # x0-space means (B, K, C, *S)
        self.logits = logits           # (B, K, 1, *S)
        self.var = var                 # shared x0-space variance (B, 1, 1, …)
        self.x_src = x_src
        self.sigma_src = sigma_src     # (B, 1, …)
        self.eps = float(eps)
        self.means_sq = means_x0.square().sum(dim=2, keepdim=True)

    @classmethod
    def from_x0(cls, means: Tensor, logits: Tensor, var: Tensor, x_src: Tensor, sigma_src: Tensor,
                eps: float = 1e-6) -> "GMFlowPolicy":
        """Build directly from the x0-space GM (means (B,K,C,*S), logits (B,K,1,*S), var (B,1,1,…))."""
        sigma = as_batch_sigma(sigma_src, x_src.shape[0], x_src.dim(), x_src.device, "sigma_src")
        if bool((sigma <= 0).any()):
            raise ValueError("sigma_src must be > 0 for a GMFlow policy")
        policy = cls.__new__(cls)
        policy._init_x0(means.float(), logits.float(), var.float(), x_src.float(), sigma, eps)
        return policy

    @property
    def num_components(self) -> int:
        return self.means.shape[1]

    def mixture_mean(self) -> Tensor:
        """Mean of the x0-space GM itself, (B, C, *S): the x̂0 at (x_src, σ_src)."""
        return (torch.softmax(self.logits, dim=1) * self.means).sum(dim=1)

    def _x0(self, x_t: Tensor, sigma_t: Tensor) -> Tensor:
        if torch.equal(sigma_t, self.sigma_src) and (x_t is self.x_src or torch.equal(x_t, self.x_src)):
            return self.mixture_mean()
        zeta, nu = gm_evidence(x_t, sigma_t, self.x_src, self.sigma_src, self.eps)
        args = (self.means, self.means_sq, self.logits, self.var, zeta, nu)
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            # Recompute in backward: keeps activation memory flat across many differentiable substeps.
            return _RecomputedPosterior.apply(*args, self.eps)
        return gm_posterior_x0(*args, self.eps)

    def _fused_path(self) -> Optional[str]:
        """"cpu" (the C kernel), "cuda" (compiled substeps) or None (plain PyTorch) for this policy's rollouts."""
        if not _fused_enabled:
            return None
        if self.means.device.type == "cpu":
            return "cpu" if _cpu_kernel() is not None else None
        if self.means.device.type == "cuda" and not (torch.is_grad_enabled() and self.means.requires_grad):
            return "cuda" if _cuda_compiled_substep() is not None else None
        return None

    def substeps(self, x: Tensor, sigmas: Tensor) -> Tensor:
        path = self._fused_path()
        if path == "cpu":
            return _FusedRollout.apply(x, sigmas, self.means, self.means_sq, self.logits, self.var, self.x_src,
                                       self.sigma_src, self.eps, _cpu_kernel())
        if path == "cuda":
            global _cuda_substep, _cuda_compile_failed
            try:
                for j in range(sigmas.shape[0] - 1):
                    x = _cuda_substep(x, sigmas[j], sigmas[j + 1], self.means, self.means_sq, self.logits,
                                      self.var, self.x_src, self.sigma_src, self.eps)
                return x
            except Exception as error:  # pragma: no cover - depends on the GPU toolchain
                warnings.warn(f"piflow: torch.compile of the GM substep failed ({type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}); GM rollouts use plain PyTorch",
                              RuntimeWarning)
                _cuda_substep, _cuda_compile_failed = None, True
        return super().substeps(x, sigmas)

    @property
    def fixed_batch(self) -> bool:
        return self._fused_path() is not None

    def detach(self) -> "GMFlowPolicy":
        return self._replace(means=self.means.detach(), logits=self.logits.detach(), var=self.var.detach(),
                             x_src=self.x_src.detach())

    def _replace(self, **changes) -> "GMFlowPolicy":
        policy = self.__class__.__new__(self.__class__)
        fields = dict(means=self.means, logits=self.logits, var=self.var, x_src=self.x_src)
        fields.update(changes)
        policy._init_x0(fields["means"], fields["logits"], fields["var"], fields["x_src"], self.sigma_src, self.eps)
        return policy

    def dropout(self, p: float, generator: Optional[torch.Generator] = None) -> "GMFlowPolicy":
        """GM dropout: drop each (sample, component) with probability p, never all components of a sample.

        The mask is shared over channels and pixels; dropped logits become −∞. No-op for p ≤ 0 or p ≥ 1.
        """
        if not 0.0 < p < 1.0:
            return self
        batch, num_components = self.logits.shape[:2]
        drop = draw("uniform", (batch, num_components), generator, self.logits.device) < p
        drop &= ~drop.all(dim=1, keepdim=True)
        drop = drop.reshape(batch, num_components, *([1] * (self.logits.dim() - 2)))
        return self._replace(logits=self.logits.masked_fill(drop, float("-inf")))

    def temperature(self, temperature: float) -> "GMFlowPolicy":
        """GM temperature T < 1 sharpens the x0-space mixture: a ← log_softmax(a/T), v ← v·T. T ≥ 1 is a no-op."""
        temperature = float(temperature)
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if temperature >= 1.0:
            return self
        temperature = max(temperature, self.eps)
        return self._replace(logits=torch.log_softmax(self.logits / temperature, dim=1), var=self.var * temperature)
