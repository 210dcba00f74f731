"""Training loop: power EMA, warm-up, NaN skipping, atomic checkpoints and exact resume."""
import math
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from piflow.train import CheckpointError, PowerEMA, TrainConfig, load_checkpoint, save_checkpoint, train

pytestmark = pytest.mark.usefixtures("single_thread")


def _regression_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    target = torch.tensor([[1.0, -2.0, 0.5]])

    def loss_fn(iteration, generator, backward):
        x = torch.randn(32, 3, generator=generator)
        return (model(x) - x @ target.T).square().mean()

    return model, loss_fn


def test_power_ema_beta_and_update():
    model = nn.Linear(2, 1, bias=False)
    ema = PowerEMA(model, gamma=7, start_iter=10)
    assert ema.beta(5) == 0.0
    assert ema.beta(10) == 0.0                      # t = 1 → (1 − 1)^8
    assert ema.beta(12) == pytest.approx((1 - 1 / 3) ** 8)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, 5)                             # before start: copy
    assert torch.equal(ema.model.weight, model.weight)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, 12)
    beta = (1 - 1 / 3) ** 8
    assert torch.allclose(ema.model.weight, torch.full_like(model.weight, beta * 1 + (1 - beta) * 3))


def test_training_reduces_loss_and_warms_up(tmp_path):
    model, loss_fn = _regression_problem()
    config = TrainConfig(iters=300, lr=0.05, warmup_iters=50, ema_start=10, progress=False, checkpoint_every=0)
    result = train(model, loss_fn, config, tmp_path)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-20:]) / 20 < 1e-3 * sum(losses[:20]) / 20
    assert result.history[0]["lr"] < 0.05 * 0.05 and result.history[-1]["lr"] == pytest.approx(0.05)
    assert (tmp_path / "checkpoint.safetensors").is_file() and (tmp_path / "train_log.jsonl").is_file()


def test_decay_given_later_equals_a_run_planned_with_it(tmp_path):
    """Warm-up, stable, decay: the last decay_iters steps use lr·d/(d+1) … lr·1/(d+1); a constant-rate run resumed
    with a larger `iters` and its decay takes exactly the steps of a run planned with the decay from the start."""
    planned_config = dict(lr=0.05, warmup_iters=2, ema_start=2, progress=False, checkpoint_every=0)
    model, loss_fn = _regression_problem()
    planned = train(model, loss_fn, TrainConfig(iters=12, decay_iters=4, **planned_config))
    # history[i]["lr"] is the rate after step i, i.e. that of step i + 1
    step_factors = [1e-3, 0.5005] + [1.0] * 6 + [4 / 5, 3 / 5, 2 / 5, 1 / 5]
    assert [h["lr"] for h in planned.history] == pytest.approx([0.05 * f for f in step_factors[1:] + [0.0]])
    model, loss_fn = _regression_problem()
    train(model, loss_fn, TrainConfig(iters=8, **planned_config), tmp_path)
    resumed = train(model, loss_fn, TrainConfig(iters=12, decay_iters=4, **planned_config), tmp_path)
    assert resumed.resumed_from == 8
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in planned.history]
    assert torch.equal(resumed.model.weight, planned.model.weight)
    with pytest.raises(ValueError, match="decay_iters"):
        TrainConfig(decay_iters=-1)


def test_train_seconds_add_up_over_resumes(tmp_path):
    """`TrainResult.train_seconds` (metrics.json's train_seconds) is the loop's wall time over every invocation:
    each step sleeps 10 ms, so 20 + 20 resumed steps take at least 0.4 s; a checkpoint written before piflow
    recorded the time resumes with an unknown (None) total."""
    import time

    model, loss_fn = _regression_problem()

    def slow(iteration, generator, backward):
        time.sleep(0.01)
        return loss_fn(iteration, generator, backward)

    config = dict(lr=0.01, warmup_iters=2, progress=False, checkpoint_every=10)
    first = train(model, slow, TrainConfig(iters=20, **config), tmp_path / "a")
    assert first.train_seconds >= 0.2
    stored = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")["train_seconds"]
    assert 0.2 <= stored <= first.train_seconds
    resumed = train(model, slow, TrainConfig(iters=40, **config), tmp_path / "a")
    assert resumed.train_seconds >= stored + 0.2
    old = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")
    del old["train_seconds"]
    save_checkpoint(tmp_path / "b" / "checkpoint.safetensors", old)
    assert train(model, slow, TrainConfig(iters=42, **config), tmp_path / "b").train_seconds is None


def test_nonfinite_steps_are_skipped():
    model, loss_fn = _regression_problem()
    before = model.weight.detach().clone()

    def nan_loss(iteration, generator, backward):
        return loss_fn(iteration, generator, backward) * float("nan")

    result = train(model, nan_loss, TrainConfig(iters=3, progress=False, checkpoint_every=0))
    assert all(h["skipped"] for h in result.history)
    assert torch.equal(model.weight, before)


def test_resume_continues_with_identical_losses(tmp_path):
    model, loss_fn = _regression_problem()
    full = train(model, loss_fn, TrainConfig(iters=40, lr=0.01, warmup_iters=5, progress=False, checkpoint_every=0))
    model, loss_fn = _regression_problem()
    train(model, loss_fn, TrainConfig(iters=20, lr=0.01, warmup_iters=5, progress=False, checkpoint_every=10),
          tmp_path)
    model, loss_fn = _regression_problem()  # a fresh process would rebuild everything
    resumed = train(model, loss_fn, TrainConfig(iters=40, lr=0.01, warmup_iters=5, progress=False,
                                                checkpoint_every=10), tmp_path)
    assert resumed.resumed_from == 20
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]


def test_sigterm_checkpoints_the_finished_step_and_resumes_exactly(tmp_path):
    """SIGTERM in the middle of step 17 lets that step finish, writes checkpoint 18 (periodic ones: every 5), stops
    with `TrainingTerminated`, restores the previous handler and releases the run directory; resuming gives the
    losses of an uninterrupted run."""
    import os

    from piflow.errors import TrainingTerminated

    def regression(term_at=None):
        model, loss_fn = _regression_problem()

        def terminating(iteration, generator, backward):
            if iteration == term_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(iteration, generator, backward)

        return model, terminating

    config = TrainConfig(iters=30, lr=0.01, warmup_iters=3, progress=False, checkpoint_every=5)
    clean = train(*regression(), config)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingTerminated, match="after step 18 \\(checkpoint at step 18\\)"):
        train(*regression(term_at=17), config, tmp_path)
    assert signal.getsignal(signal.SIGTERM) is before
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")["step"] == 18
    resumed = train(*regression(), config, tmp_path)
    assert resumed.resumed_from == 18
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in clean.history]


@pytest.mark.slow                 # ~15 s: three training processes, each importing torch
def test_sigkill_mid_training_resumes_exactly(tmp_path):
    """A run killed with SIGKILL resumes from its last checkpoint with the losses of an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent("""
        import os, signal, sys, torch
        from torch import nn
        from piflow.train import TrainConfig, train
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = nn.Linear(3, 1)
        kill_at = int(sys.argv[2])
        def loss_fn(iteration, generator, backward):
            if iteration == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            x = torch.randn(16, 3, generator=generator)
            return (model(x) - x.sum(1, keepdim=True)).square().mean()
        train(model, loss_fn, TrainConfig(iters=30, lr=0.01, warmup_iters=3, progress=False, checkpoint_every=5),
              sys.argv[1])
    """))
    killed = subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "17"])
    assert killed.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")["step"] == 15
    subprocess.run([sys.executable, str(script), str(tmp_path / "a"), "-1"], check=True)
    subprocess.run([sys.executable, str(script), str(tmp_path / "b"), "-1"], check=True)
    resumed = load_checkpoint(tmp_path / "a" / "checkpoint.safetensors")["history"]
    clean = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors")["history"]
    assert [h["loss"] for h in resumed] == [h["loss"] for h in clean]


def test_corrupt_checkpoint_is_reported_and_never_overwritten(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    save_checkpoint(path, {"step": 3, "payload": torch.arange(1000)})
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)
    model, loss_fn = _regression_problem()
    with pytest.raises(CheckpointError):
        train(model, loss_fn, TrainConfig(iters=5, progress=False), tmp_path)
    assert path.read_bytes() == good[: len(good) // 2]   # the loop did not overwrite it
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_mismatched_checkpoint_gives_clear_error(tmp_path):
    model, loss_fn = _regression_problem()
    train(model, loss_fn, TrainConfig(iters=2, progress=False), tmp_path)
    other = nn.Linear(4, 1)
    with pytest.raises(CheckpointError, match="does not match"):
        train(other, lambda it, g, backward: other(torch.randn(2, 4)).sum(), TrainConfig(iters=4, progress=False),
              tmp_path)


def test_bad_train_config():
    with pytest.raises(ValueError, match="iters"):
        TrainConfig(iters=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=math.nan)


def test_bf16_autocast_and_gradient_accumulation_train():
    model, loss_fn = _regression_problem()
    config = TrainConfig(iters=150, lr=0.05, warmup_iters=10, progress=False, checkpoint_every=0,
                         mixed_precision="bf16", grad_accum_steps=2)
    result = train(model, loss_fn, config)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-10:]) / 10 < 0.05 * sum(losses[:10]) / 10
    assert model.weight.dtype == torch.float32          # master weights stay fp32
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    with pytest.raises(ValueError, match="grad_accum_steps"):
        TrainConfig(grad_accum_steps=0)


def test_ema_shares_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    model[0].requires_grad_(False)                     # a frozen "base"
    ema = PowerEMA(model, gamma=7, start_iter=0)
    assert ema.model[0].weight is model[0].weight      # tied, no second copy
    assert ema.model[1].weight is not model[1].weight and not ema.model[1].weight.requires_grad
    assert model[1].weight.requires_grad and not model[0].weight.requires_grad   # the model is left as it was
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model, 5)
    beta = (1 - 1 / 6) ** 8
    expected = beta * (model[1].weight - 1.0) + (1 - beta) * model[1].weight
    torch.testing.assert_close(ema.model[1].weight, expected)


def test_default_checkpoint_cadence_suits_short_and_long_runs():
    """Auto cadence: a tenth of the run (so a 200-iteration run stopped near its end keeps 180 iterations), at most
    every 500; 0 still means only at the end."""
    assert TrainConfig(iters=200).checkpoint_interval == 20
    assert TrainConfig(iters=5).checkpoint_interval == 1
    assert TrainConfig(iters=100_000).checkpoint_interval == 500
    assert TrainConfig(iters=200, checkpoint_every=0).checkpoint_interval == 0
    for bad in (-1, 2.5, "often"):
        with pytest.raises(ValueError, match="checkpoint_every"):
            TrainConfig(checkpoint_every=bad)


def test_short_run_killed_near_its_end_keeps_most_of_its_work(tmp_path):
    model, loss_fn = _regression_problem()

    def dies_at_195(iteration, generator, backward):
        if iteration == 195:
            raise KeyboardInterrupt
        return loss_fn(iteration, generator, backward)

    with pytest.raises(KeyboardInterrupt):
        train(model, dies_at_195, TrainConfig(iters=200, progress=False), tmp_path)
    assert load_checkpoint(tmp_path / "checkpoint.safetensors")["step"] == 180


@pytest.mark.parametrize("data_free", [True, False])
def test_fp16_gives_the_fp32_update(data_free):
    # The loop hands loss functions a `backward` that applies grad-accumulation and the fp16 GradScaler's scale;
    # data-free π-ID calls it once per segment. Before, data-free losses were back-propagated unscaled and then
    # unscaled again by the GradScaler (gradients 65536× too small): the fp16 update must equal the fp32 one.
    from piflow.model import PiFlow
    from piflow.models import MLPVelocityModel2D
    from piflow.models.students import PolicyStudent
    from piflow.teachers import GaussianMixtureTeacher

    teacher = GaussianMixtureTeacher(torch.tensor([[-1.0, 0.5], [1.0, -0.5]]), 0.4)
    updates, norms = {}, {}
    for precision in ("no", "fp16"):
        torch.manual_seed(0)
        student = PolicyStudent(MLPVelocityModel2D(hidden_size=32, num_layers=2), num_components=2,
                                logstd_hidden=16, generator=torch.Generator().manual_seed(0))
        pf = PiFlow(student, teacher, nfe=2, total_substeps=16, policy_dropout=0.0)
        before = [p.detach().clone() for p in student.parameters()]

        def loss_fn(iteration, generator, backward):
            x = torch.randn(16, 2, generator=generator)
            if data_free:
                return pf.data_free_loss(x, backward=backward, generator=generator)
            return pf(teacher.sample(16, generator=generator), generator=generator)

        config = TrainConfig(iters=1, lr=1e-3, warmup_iters=0, grad_clip=0.0, ema_start=0, progress=False,
                             mixed_precision=precision, grad_accum_steps=2)
        result = train(student, loss_fn, config)
        assert not result.history[0]["skipped"]
        norms[precision] = result.history[0]["grad_norm"]
        updates[precision] = torch.cat([(p.detach() - b).flatten() for p, b in zip(student.parameters(), before)])
    assert norms["fp16"] == pytest.approx(norms["no"], rel=0.05)
    difference = (updates["fp16"] - updates["no"]).norm() / updates["no"].norm()
    assert float(difference) < 0.2


def test_loss_fn_protocol_errors():
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="backward"):
        train(model, lambda it, g, backward: torch.tensor(1.0), TrainConfig(iters=1, progress=False))
    with pytest.raises(TypeError, match="scalar"):
        train(model, lambda it, g, backward: model(torch.ones(3, 2)), TrainConfig(iters=1, progress=False))
