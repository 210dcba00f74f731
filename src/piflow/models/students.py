"""Policy students: a teacher backbone with its output projection replaced by a GM or DX head (§6.1).

Works with any velocity network that exposes
* ``features(x, t, cond) -> (h, cond_emb)``: h (B, D) for vector data or (B, L, D) tokens, cond_emb (B, E);
* ``proj_out``: the nn.Linear output projection (D → out_dim) that the head replicates;
* for token models, ``unpatchify(tokens (B, L, p²·c), channels=c) -> (B, c, *spatial)``.

A network trained as a diffusion model (ε-, v- or x0-prediction, `piflow.train.flow_matching.denoising_loss`) works
too, with its `DiffusionTeacher` conversion (``diffusion=``): the backbone then sees (x_t, t) =
``network_inputs(x_σ, σ)`` and the head's per-component outputs (in the network's output units, replicated from
its projection) are mapped to velocities by the same affine map as the teacher's, u = a·out + b·x_t, with every
GM std scaled by |a| (docs/algorithm.md §15, as `DiffusersPolicyStudent` does).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from piflow.checks import as_batch_sigma
from piflow.diffusion import DiffusionTeacher
from piflow.heads import make_policy_head
from piflow.settings import policy_kind
from piflow.timewarp import NUM_TIMESTEPS


class PolicyStudent(nn.Module):
    """Student ``(x, sigma (B,), cond) -> dict`` of GMFlow (means/logweights/logstds) or DX (u_grid) parameters.

    Args:
        teacher_model: the velocity network; its weights are copied (the student owns an independent, trainable
            copy, whether or not the teacher's parameters were frozen).
        policy: "gmflow" or "dx". num_components: K (GM). num_nodes: N and dx_mode (DX).
        num_timesteps: S_t; the network sees t = σ·S_t.
        init_from_teacher: replicate the teacher's output projection into the head (else the no-teacher init).
        head_noise_std: symmetry-breaking bias noise of the GM means (std in u units).
        logstd_hidden: width of the GM log-std MLP.
        diffusion: the `DiffusionTeacher` of a diffusion-trained network (its network-free `without_model()` copy
            is kept), or None for a velocity network.
    """

    def __init__(self, teacher_model: nn.Module, policy: str = "gmflow", num_components: int = 8,
                 num_nodes: int = 10, dx_mode: str = "grid", num_timesteps: float = NUM_TIMESTEPS,
                 init_from_teacher: bool = True, head_noise_std: float = 0.05, logstd_hidden: int = 1024,
                 generator: Optional[torch.Generator] = None, diffusion: Optional[DiffusionTeacher] = None):
        super().__init__()
        self.diffusion = None if diffusion is None else diffusion.without_model()
        projection = getattr(teacher_model, "proj_out", None)
        if not isinstance(projection, nn.Linear) or not hasattr(teacher_model, "features"):
            raise TypeError("teacher_model must expose features(x, t, cond) and an nn.Linear proj_out")
        # trainable even when the teacher was frozen first (recipes freeze their teacher): the paper fine-tunes the
        # whole network, not only the head
        self.backbone = copy.deepcopy(teacher_model).requires_grad_(True)
        del self.backbone.proj_out            # replaced by the head; keeps DDP free of unused parameters
        self.policy_kind = policy_kind(policy)
        self.num_timesteps = float(num_timesteps)
        in_dim, out_dim = projection.in_features, projection.out_features
        self.channels = int(getattr(teacher_model, "out_channels", getattr(teacher_model, "in_channels", out_dim)))
        self.head = make_policy_head(
            self.policy_kind, in_dim, out_dim, channels=self.channels,
            cond_dim=int(getattr(teacher_model, "cond_dim", in_dim)), num_components=num_components,
            num_nodes=num_nodes, dx_mode=dx_mode, logstd_hidden=logstd_hidden,
            teacher_projection=projection if init_from_teacher else None, noise_std=head_noise_std,
            generator=generator)

    def _to_spatial(self, per_position: Tensor, channels: int) -> Tensor:
        """(B, *positions, K, out) → (B, K, c, *spatial): vector data needs only a transpose, tokens unpatchify."""
        if per_position.dim() == 3:                        # (B, K, out): vector data, one position
            return per_position
        batch, length, num, width = per_position.shape
        tokens = per_position.permute(0, 2, 1, 3).reshape(batch * num, length, width)
        spatial = self.backbone.unpatchify(tokens, channels)
        return spatial.reshape(batch, num, *spatial.shape[1:])

    def _velocities(self, outputs: Tensor, x_in: Tensor, t_in: Tensor) -> Tensor:
        """(B, K, c, *spatial) per-component network outputs → velocities a·out_k + b·x_t (diffusion networks;
        a velocity network's outputs are velocities already)."""
        if self.diffusion is None:
            return outputs
        return self.diffusion.component_velocities(outputs, x_in, t_in).to(outputs.dtype)

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> dict:
        sigma = as_batch_sigma(sigma, x.shape[0], 1, x.device, check=False)
        if self.diffusion is None:
            x_in, t_in = x, sigma * self.num_timesteps
        else:
            x_in, t_in = self.diffusion.network_inputs(x, sigma)
        features, cond_emb = self.backbone.features(x_in, t_in, cond)
        if self.policy_kind == "dx":
            return {"u_grid": self._velocities(self._to_spatial(self.head(features), self.channels), x_in, t_in)}
        out = self.head(features, cond_emb)
        logweights, logstds = out.logweights, out.logstds
        if self.diffusion is not None:       # the velocity GM is the output GM pushed forward
            logstds = self.diffusion.velocity_logstds(logstds, t_in)
        if logweights.dim() == 3:                          # vector data: (B, K, 1) already
            return {"means": self._velocities(out.means, x_in, t_in), "logweights": logweights, "logstds": logstds}
        return {"means": self._velocities(self._to_spatial(out.means, self.channels), x_in, t_in),
                "logweights": self._to_spatial(logweights, 1), "logstds": logstds}
