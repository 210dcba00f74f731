"""Progress without a terminal: a few readable lines, not thousands of carriage returns."""
import io

import torch

from piflow.progress import LineProgress, progress_bar
from piflow.train import TrainConfig, train


def test_line_progress_prints_about_ten_lines():
    out = io.StringIO()
    bar = progress_bar(1000, "distill", file=out)
    assert isinstance(bar, LineProgress)
    for i in range(1000):
        bar.set_postfix_str(f"loss {1.0 / (i + 1):.3g}")
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 10 <= len(lines) <= 11
    assert lines[0].startswith("distill: 100/1000 (10%)") and "it/s" in lines[0] and "loss" in lines[0]
    assert lines[-1].startswith("distill: 1000/1000 (100%)")


def test_resumed_progress_counts_from_the_start_step():
    out = io.StringIO()
    bar = progress_bar(100, "x", initial=60, file=out)
    for _ in range(40):
        bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("x: 70/100") and lines[-1].startswith("x: 100/100") and len(lines) == 4


def test_training_progress_shows_a_running_loss(capsys):
    """The training loop's progress (stderr is not a TTY under pytest): ~10 lines, each with the running loss."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 1)
    losses = []

    def loss_fn(iteration, generator, backward):
        loss = model(torch.randn(8, 2, generator=generator)).square().mean()
        losses.append(float(loss.detach()))
        return loss

    train(model, loss_fn, TrainConfig(iters=50, progress=True, checkpoint_every=0, log_every=5), desc="fit")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 10 and all(line.startswith("fit: ") and "loss " in line for line in lines)
    expected = sum(losses[-5:]) / 5                          # mean of the last log_every losses
    assert lines[-1].endswith(f"loss {expected:.4g}")


def test_disabled_progress_is_silent(capsys):
    bar = progress_bar(10, "x", enabled=False)
    bar.update(10)
    bar.close()
    assert capsys.readouterr().err == ""
