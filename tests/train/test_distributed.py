"""torchrun with 2 CPU processes (gloo): ranks stay in sync and take the step of one process on the global batch."""
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    from piflow.train import TrainConfig, train
    from piflow.train.distributed import init_distributed
    torch.set_num_threads(1)
    info = init_distributed()
    torch.manual_seed(123 + info.rank)          # different init per rank: rank 0's weights must win
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    data = torch.randn(2, 16, 3, generator=torch.Generator().manual_seed(0))
    calls = [0]
    def loss_fn(iteration, generator, backward):
        shard = info.rank if info.enabled else calls[0] % 2   # one process: both shards via accumulation
        calls[0] += 1
        x = data[shard] * (1 + iteration)
        return (model(x) - x.sum(1, keepdim=True).sin()).square().mean()
    accum = 1 if info.enabled else 2
    train(model, loss_fn, TrainConfig(iters=6, lr=0.05, warmup_iters=0, progress=False, checkpoint_every=0,
                                      grad_accum_steps=accum))
    torch.save(model.state_dict(), f"{sys.argv[1]}/rank{info.rank}_world{info.world_size}.pt")
    from piflow.train.distributed import shutdown
    shutdown()
""")



@pytest.mark.slow                 # ~15 s: two torchrun processes, each importing torch
def test_two_process_training_matches_single_process(tmp_path, free_port):
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port), str(script), str(tmp_path)],
                   check=True, timeout=240)
    # the single-process reference starts from the same weights as rank 0 (seed 123)
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, timeout=120)
    rank0 = torch.load(tmp_path / "rank0_world2.pt")
    rank1 = torch.load(tmp_path / "rank1_world2.pt")
    single = torch.load(tmp_path / "rank0_world1.pt")
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=1e-5)
    assert not torch.equal(rank0["0.weight"], single["0.weight"] * 0)   # trained, non-trivial
