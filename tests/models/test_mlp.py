"""Tests for piflow.models.mlp."""
import pytest
import torch

from piflow.models import MLPBackbone2D, MLPVelocityModel2D


def test_backbone_features_shapes_and_init():
    torch.manual_seed(0)
    backbone = MLPBackbone2D(in_channels=2, hidden_size=64, num_layers=3)
    assert backbone.feature_dim == 64 and backbone.cond_dim == 64 and backbone.in_channels == 2
    h, cond = backbone.features(torch.randn(7, 2), torch.rand(7) * 1000)
    assert h.shape == (7, 64) and cond.shape == (7, 64)
    linears = [m for m in backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 4  # 3 layers + cond embed
    assert linears[0].in_features == 256 + 256
    assert all(torch.all(m.bias == 0) for m in linears)


def test_cond_emb_depends_on_t_only():
    torch.manual_seed(0)
    backbone = MLPBackbone2D(hidden_size=32, num_layers=2)
    t = torch.full((4,), 250.0)
    h1, c1 = backbone.features(torch.randn(4, 2), t)
    h2, c2 = backbone.features(torch.randn(4, 2), t)
    assert torch.equal(c1, c2) and not torch.allclose(h1, h2)


def test_velocity_model_forward():
    torch.manual_seed(0)
    model = MLPVelocityModel2D(hidden_size=32, num_layers=2)
    x = torch.randn(6, 2)
    u = model(x, torch.rand(6) * 1000)
    assert u.shape == (6, 2) and torch.isfinite(u).all()
    assert model(x, 500.0).shape == (6, 2)
    assert model.proj_out.in_features == 32 and model.proj_out.out_features == 2
    h, cond = model.features(x, 500.0)
    assert torch.allclose(model.proj_out(h), model(x, 500.0))
    u.sum().backward()
    assert all(p.grad is not None for p in model.backbone.layers.parameters())


def test_mlp_other_channel_count():
    model = MLPVelocityModel2D(in_channels=3, hidden_size=16, num_layers=1)
    assert model(torch.randn(2, 3), 1.0).shape == (2, 3)


def test_mlp_bad_input():
    model = MLPVelocityModel2D(hidden_size=16, num_layers=1)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        model(torch.randn(4, 3), 1.0)
    with pytest.raises(ValueError, match=r"x must have shape"):
        model(torch.randn(4, 2, 1), 1.0)
    with pytest.raises(ValueError, match="t must"):
        model(torch.randn(4, 2), torch.ones(3))
    with pytest.raises(ValueError, match="cond"):
        model(torch.randn(4, 2), 1.0, cond=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_size"):
        MLPBackbone2D(hidden_size=0)


def test_mlp_extra_condition_shifts_the_timestep_sinusoid():
    from piflow.models import MLPVelocityModel2D
    from piflow.models.embeddings import timestep_embedding

    torch.manual_seed(0)
    model = MLPVelocityModel2D(hidden_size=16, num_layers=2, time_embed_dim=8)
    x = torch.randn(3, 2)
    t = torch.tensor([100.0, 500.0, 900.0])
    assert model.extra_condition_dim == 8
    torch.testing.assert_close(model(x, t, extra_condition=torch.zeros(3, 8)), model(x, t))
    # adding the sinusoid difference of two timesteps turns t into t2 in the main branch and the cond branch
    t2 = torch.tensor([200.0, 50.0, 990.0])
    shift = timestep_embedding(t2, 8) - timestep_embedding(t, 8)
    torch.testing.assert_close(model(x, t, extra_condition=shift), model(x, t2), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="extra_condition must have shape"):
        model(x, t, extra_condition=torch.zeros(3, 7))
