"""FlowMapSDEScheduler as a diffusers scheduler: stock config, σ grid, step semantics, save/load."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from piflow.integrations.diffusers.scheduler import FlowMapSDEScheduler  # noqa: E402
from piflow.timewarp import warp  # noqa: E402


def test_from_stock_flow_config_gives_the_flux_grid():
    stock = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.2)
    scheduler = FlowMapSDEScheduler.from_config(stock.config, final_step_size_scale=0.5)
    scheduler.set_timesteps(4)
    torch.testing.assert_close(scheduler.sigmas, torch.tensor([1.0, 0.8889, 0.7059, 0.3478, 0.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(scheduler.timesteps, scheduler.sigmas[:-1] * 1000)
    x = torch.randn(2, 4, 8, 8)
    for i, t in enumerate(scheduler.timesteps):          # h = 0: the step is the identity, index follows timesteps
        assert torch.equal(scheduler.step(x, t, x).prev_sample, x)
        assert scheduler.step_index == i + 1


def test_dynamic_shift_and_renoising():
    stock = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler = FlowMapSDEScheduler.from_config(stock.config, h="inf")
    with pytest.raises(ValueError, match="image_seq_len"):
        scheduler.set_timesteps(2)
    scheduler.set_timesteps(2, image_seq_len=4096)
    assert scheduler.shift_in_use == pytest.approx(math.exp(1.15))
    assert scheduler.sigmas[1].item() == pytest.approx(warp(0.5, math.exp(1.15)), abs=1e-6)
    assert torch.all(scheduler.sigmas_dst == 0)              # h = inf: roll out to σ = 0, then re-noise
    out = scheduler.step(torch.zeros(20000), scheduler.timesteps[0], generator=torch.Generator().manual_seed(0))
    assert out.prev_sample.std().item() == pytest.approx(scheduler.sigmas[1].item(), rel=0.03)


def test_save_and_load_round_trip(tmp_path):
    scheduler = FlowMapSDEScheduler(shift=3.2, final_step_size_scale=0.5, h=0.5)
    scheduler.save_pretrained(tmp_path)
    loaded = FlowMapSDEScheduler.from_pretrained(tmp_path)
    assert loaded.config.shift == 3.2 and loaded.config.final_step_size_scale == 0.5 and loaded.config.h == 0.5
    loaded.set_timesteps(3)
    scheduler.set_timesteps(3)
    torch.testing.assert_close(loaded.sigmas_dst, scheduler.sigmas_dst)


def test_errors():
    scheduler = FlowMapSDEScheduler()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 1000.0)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="not one of"):
        scheduler.step(torch.zeros(1), 123.0)
    with pytest.raises(ValueError, match="nfe"):
        scheduler.set_timesteps(0)
