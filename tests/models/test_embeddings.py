"""Tests for piflow.models.embeddings."""
import math

import pytest
import torch

from piflow.models.embeddings import as_timestep, fourier_position_embedding, timestep_embedding


def test_timestep_embedding_shape_and_values():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = timestep_embedding(t, 256)
    assert emb.shape == (3, 256) and emb.dtype == torch.float32
    # t = 0: cos half is 1, sin half is 0 (flip_sin_to_cos=True puts cos first)
    assert torch.allclose(emb[0, :128], torch.ones(128)) and torch.allclose(emb[0, 128:], torch.zeros(128))
    # first frequency is 1 -> cos(t), sin(t)
    assert torch.allclose(emb[1, 0], torch.tensor(math.cos(1.0))) and torch.allclose(emb[1, 128], torch.tensor(math.sin(1.0)))
    flipped = timestep_embedding(t, 256, flip_sin_to_cos=False)
    assert torch.equal(flipped[:, :128], emb[:, 128:])


def test_timestep_embedding_odd_dim_pads_zero():
    emb = timestep_embedding(torch.tensor([3.0, 4.0]), 7)
    assert emb.shape == (2, 7) and torch.all(emb[:, -1] == 0)


def test_timestep_embedding_bad_input():
    with pytest.raises(ValueError, match="t must"):
        timestep_embedding(torch.zeros(2, 3), 8)
    with pytest.raises(ValueError, match="dim"):
        timestep_embedding(torch.zeros(2), 0)


def test_fourier_position_embedding():
    x = torch.randn(5, 2)
    emb = fourier_position_embedding(x, 128)
    assert emb.shape == (5, 256)
    assert torch.all(emb.abs() <= 1.0 + 1e-6)
    # per coordinate: sin^2 + cos^2 = 1
    per = emb.view(5, 2, 2, 64)
    assert torch.allclose(per[:, :, 0] ** 2 + per[:, :, 1] ** 2, torch.ones(5, 2, 64), atol=1e-5)
    # longest period is max_period: the last sine is sin(2 pi x / 50)
    assert torch.allclose(per[:, :, 0, -1], torch.sin(2 * math.pi * x / 50.0), atol=1e-5)


def test_fourier_position_embedding_bad_input():
    with pytest.raises(ValueError, match=r"x must have|x must be"):
        fourier_position_embedding(torch.zeros(5), 8)
    with pytest.raises(ValueError, match="dim_per_coord"):
        fourier_position_embedding(torch.zeros(5, 2), 7)
    with pytest.raises(ValueError, match="min_period"):
        fourier_position_embedding(torch.zeros(5, 2), 8, min_period=1.0, max_period=0.5)


def test_as_timestep():
    assert torch.equal(as_timestep(3.0, 4, torch.device("cpu")), torch.full((4,), 3.0))
    assert as_timestep(torch.tensor([[1.0], [2.0]]), 2, torch.device("cpu")).shape == (2,)
    with pytest.raises(ValueError, match="t must"):
        as_timestep(torch.zeros(3), 4, torch.device("cpu"))
