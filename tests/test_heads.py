"""Tests for piflow.heads: GM/DX head initialisation from a teacher projection and the detached log-std path."""
import math

import pytest
import torch
from torch import nn

from piflow.heads import DXHead, GMHead

pytestmark = pytest.mark.usefixtures("single_thread")

IN, P, C, K, COND = 8, 4, 3, 5, 6


def _teacher_projection(seed=0, bias=True):
    torch.manual_seed(seed)
    proj = nn.Linear(IN, P * C, bias=bias)
    if bias:
        nn.init.normal_(proj.bias)
    return proj


@pytest.mark.parametrize("layout", ["pc", "cp"])
def test_gm_head_init_from_teacher(layout):
    proj = _teacher_projection()
    head = GMHead(IN, P * C, K, COND, channels=C, logstd_hidden=16, layout=layout)
    head.init_from_teacher(proj, noise_std=0.05, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    features = torch.randn(2, 7, IN, generator=g)               # (B, positions, in_dim)
    cond = torch.randn(2, COND, generator=g)
    out = head(features, cond)
    assert out.means.shape == (2, 7, K, P * C)
    assert out.logweights.shape == (2, 7, K, P) and out.logstds.shape == (2,)
    with torch.no_grad():
        teacher_out = proj(features)                              # (B, L, P·C)
    noise = out.means.detach() - teacher_out.unsqueeze(2)        # (B, L, K, P·C)
    # the noise is a per-(component, channel) constant: identical for every sample and position …
    torch.testing.assert_close(noise, noise[:1, :1].expand_as(noise), rtol=0, atol=1e-5)
    noise = noise[0, 0]                                          # (K, P·C)
    # … and identical across the pixels of one position in the projection's layout
    per_pixel = noise.reshape(K, P, C) if layout == "pc" else noise.reshape(K, C, P).transpose(1, 2)
    torch.testing.assert_close(per_pixel, per_pixel[:, :1].expand_as(per_pixel), rtol=0, atol=1e-5)
    # small symmetry-breaking noise that differs between components
    assert 0.0 < float(per_pixel[:, 0].std()) < 0.15
    assert float((per_pixel[0, 0] - per_pixel[1, 0]).abs().max()) > 1e-4
    # uniform weights, initial log-std log 0.05
    torch.testing.assert_close(out.logweights, torch.full_like(out.logweights, -math.log(K)))
    torch.testing.assert_close(out.logstds, torch.full((2,), math.log(0.05)))
    # another init_std
    head.init_from_teacher(proj, init_std=0.2)
    torch.testing.assert_close(head(features, cond).logstds, torch.full((2,), math.log(0.2)))


def test_gm_head_channel_layouts_differ():
    # same generator → same (K, C) noise; "pc" puts channel fastest, "cp" pixel fastest
    proj = _teacher_projection()
    heads = {}
    for layout in ("pc", "cp"):
        heads[layout] = GMHead(IN, P * C, K, COND, channels=C, logstd_hidden=16, layout=layout)
        heads[layout].init_from_teacher(proj, generator=torch.Generator().manual_seed(3))
    bias_t = proj.bias.detach().repeat(K)
    n_pc = (heads["pc"].proj_means.bias.detach() - bias_t).reshape(K, P, C)[:, 0]     # (K, C)
    n_cp = (heads["cp"].proj_means.bias.detach() - bias_t).reshape(K, C, P)[:, :, 0]  # (K, C)
    torch.testing.assert_close(n_pc, n_cp)


def test_gm_head_without_teacher_and_no_bias_teacher():
    head = GMHead(IN, P * C, K, COND, channels=C, logstd_hidden=16)
    assert float(head.proj_means.weight.detach().abs().sum()) == 0.0
    out = head(torch.randn(3, IN), torch.randn(3, COND))
    assert out.means.shape == (3, K, P * C)
    # means are the bias noise only (independent of the features)
    torch.testing.assert_close(out.means[0], out.means[1])
    torch.testing.assert_close(out.logstds, torch.zeros(3))
    proj = _teacher_projection(bias=False)
    head.init_from_teacher(proj, noise_std=0.0)
    x = torch.randn(4, IN)
    with torch.no_grad():
        torch.testing.assert_close(head(x, torch.randn(4, COND)).means, proj(x).unsqueeze(1).expand(4, K, P * C))


def test_logstd_mlp_reads_detached_condition():
    head = GMHead(IN, P * C, K, COND, channels=C, logstd_hidden=16)
    head.init_from_teacher(_teacher_projection())
    # make the log-std depend on its input so that a non-detached path would carry gradient
    nn.init.normal_(head.logstd_mlp[-1].weight)
    features = torch.randn(2, 3, IN, requires_grad=True)
    cond = torch.randn(2, COND, requires_grad=True)
    out = head(features, cond)
    out.logstds.sum().backward()
    assert cond.grad is None                       # no gradient reaches the conditioning embedding
    assert head.logstd_mlp[-1].bias.grad is not None and float(head.logstd_mlp[-1].weight.grad.abs().sum()) > 0
    first = [m for m in head.logstd_mlp if isinstance(m, nn.Linear)][0]
    assert first.weight.grad is not None and float(first.weight.grad.abs().sum()) > 0
    # the means path does reach the features
    (out.means.sum() + out.logweights.sum()).backward()
    assert features.grad is not None and cond.grad is None


def test_dx_head_init():
    proj = _teacher_projection()
    x = torch.randn(2, 5, IN)
    grid = DXHead(IN, P * C, num_nodes=4, mode="grid")
    out0 = grid(x)
    assert out0.shape == (2, 5, 4, P * C) and float(out0.detach().abs().sum()) == 0.0
    grid.init_from_teacher(proj)
    with torch.no_grad():
        ref = proj(x)
        torch.testing.assert_close(grid(x), ref.unsqueeze(2).expand(2, 5, 4, P * C), rtol=0, atol=1e-6)
        poly = DXHead(IN, P * C, num_nodes=3, mode="polynomial")
        poly.init_from_teacher(proj)
        out = poly(x)
        torch.testing.assert_close(out[:, :, 0], ref, rtol=0, atol=1e-6)
        assert float(out[:, :, 1:].abs().max()) == 0.0


def test_head_errors():
    with pytest.raises(ValueError, match="channels"):
        GMHead(IN, 10, K, COND, channels=3)
    with pytest.raises(ValueError, match="channels"):
        GMHead(IN, 12, K, COND, channels=0)
    with pytest.raises(ValueError, match="num_components"):
        GMHead(IN, 12, 0, COND, channels=3)
    with pytest.raises(ValueError, match="layout"):
        GMHead(IN, 12, K, COND, channels=3, layout="hw")
    with pytest.raises(ValueError):
        GMHead(IN, 12, K, COND, channels=3, num_logstd_layers=0)
    head = GMHead(IN, 12, K, COND, channels=3, logstd_hidden=16)
    with pytest.raises(ValueError):
        head.init_from_teacher(nn.Linear(IN, 13))
    with pytest.raises(ValueError):
        head.init_from_teacher(nn.Linear(IN + 1, 12))
    with pytest.raises(TypeError):
        head.init_from_teacher(nn.Conv1d(IN, 12, 1))
    with pytest.raises(ValueError, match="in_dim"):
        head(torch.randn(2, IN + 1), torch.randn(2, COND))
    with pytest.raises(ValueError, match="num_nodes"):
        DXHead(IN, 12, 0)
    with pytest.raises(ValueError, match="mode"):
        DXHead(IN, 12, 3, mode="spline")
    dx = DXHead(IN, 12, 3)
    with pytest.raises(ValueError):
        dx.init_from_teacher(nn.Linear(IN, 11))
    with pytest.raises(ValueError, match="in_dim"):
        dx(torch.randn(2, IN - 1))
