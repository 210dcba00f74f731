"""Policy students: a teacher backbone with its output projection replaced by a GM or DX head (§6.1).

Works with any velocity network that exposes
* ``features(x, t, cond) -> (h, cond_emb)``: h (B, D) for vector data or (B, L, D) tokens, cond_emb (B, E);
* ``proj_out``: the nn.Linear output projection (D → out_dim) that the head replicates;
* for token models, ``unpatchify(tokens (B, L, p²·c), channels=c) -> (B, c, *spatial)``.
"""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import Tensor, nn

from piflow.checks import as_batch_sigma
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
    """

    def __init__(self, teacher_model: nn.Module, policy: str = "gmflow", num_components: int = 8,
                 num_nodes: int = 10, dx_mode: str = "grid", num_timesteps: float = NUM_TIMESTEPS,
                 init_from_teacher: bool = True, head_noise_std: float = 0.05, logstd_hidden: int = 1024,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
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

    def forward(self, x: Tensor, sigma: Tensor, cond: Any = None) -> dict:
        sigma = as_batch_sigma(sigma, x.shape[0], 1, x.device, check=False)
        features, cond_emb = self.backbone.features(x, sigma * self.num_timesteps, cond)
        if self.policy_kind == "dx":
            return {"u_grid": self._to_spatial(self.head(features), self.channels)}
        out = self.head(features, cond_emb)
        logweights = out.logweights
        if logweights.dim() == 3:                          # vector data: (B, K, 1) already
            return {"means": out.means, "logweights": logweights, "logstds": out.logstds}
        return {"means": self._to_spatial(out.means, self.channels),
                "logweights": self._to_spatial(logweights, 1), "logstds": out.logstds}
