"""Per-sample substep counts vs the batch-maximum schedule, on the rollouts a π-ID step makes.

    python benchmarks/rollout_schedule.py [--batch 16] [--components 8] [--repeats 7]

A π-ID step rolls the detached policy of each sample from its segment start to random intermediate states, so the
samples of a batch need different substep counts (algorithm.md §4.3). piflow runs each sample for exactly its own
count (samples run longest first and leave the batch when done); the reference runs every sample for the batch's
largest count, finished samples taking zero-length substeps. Both run in plain PyTorch; the third side is piflow's
default, the fused CPU kernel, which takes the whole batch and skips each sample's zero-length substeps itself. All
are timed in one process, interleaved, on the same
GM policies (K components over 4×32×32 latents) and the same random (segment, state) draws as the 4-NFE text-to-image
settings (f = 0.5, shift 3.2, 128 substeps per unit time); the script prints the substeps each does, the median time
and the spread (min–max) of `--repeats` interleaved repeats, and the ratios of medians.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from piflow.piid import sample_segments
from piflow.policies import GMFlowPolicy, gmflow
from piflow.rollout import num_substeps, rollout_tau
from piflow.timewarp import warp
from timing import interleaved_seconds


def batch_max_rollout(policy, x, tau_start, tau_end, total, shift):
    """Every sample runs the batch's largest count (finished samples: zero-length substeps)."""
    counts = num_substeps(tau_start, tau_end, total)
    step = (tau_start - tau_end) / counts
    index = torch.arange(int(counts.max()) + 1, dtype=torch.float32).reshape(-1, *([1] * x.dim()))
    sigmas = warp(torch.where(index >= counts, tau_end, tau_start - index * step).clamp(min=0), shift)
    for j in range(int(counts.max())):
        x = policy.euler_substep(x, sigmas[j], sigmas[j + 1])
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--components", type=int, default=8)
    parser.add_argument("--states", type=int, default=4, help="intermediate states M per sample")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    batch, k, shape, total, shift = args.batch, args.components, (4, 32, 32), 128, 3.2
    tau_src, segment = sample_segments(batch, 4, 0.5, generator=gen)
    tau_src, segment = tau_src.reshape(-1, 1, 1, 1), segment.reshape(-1, 1, 1, 1)
    sigma_src = warp(tau_src, shift)
    x_src = torch.randn(batch, *shape, generator=gen)
    policy = GMFlowPolicy(torch.randn(batch, k, *shape, generator=gen), torch.full((batch,), -1.0),
                          torch.log_softmax(torch.randn(batch, k, 1, *shape[1:], generator=gen), dim=1), x_src,
                          sigma_src.reshape(-1))
    # M sorted intermediate states per sample, as π-ID draws them; each rollout continues from the previous state
    ends = [tau_src - segment * f for f in torch.rand(args.states, batch, 1, 1, 1, generator=gen).sort(0).values]
    starts = [tau_src] + ends[:-1]
    ours_substeps = sum(int(num_substeps(a, b, total).sum()) for a, b in zip(starts, ends))
    max_substeps = sum(batch * int(num_substeps(a, b, total).max()) for a, b in zip(starts, ends))

    def plain(fn):
        def run_plain(*args):
            with gmflow.fused_rollout(False):
                return fn(*args)
        return run_plain

    sides = {"per_sample": plain(rollout_tau), "batch_max": plain(batch_max_rollout), "fused": rollout_tau}

    def run(fn):
        x = x_src
        with torch.inference_mode():
            for a, b in zip(starts, ends):
                x = fn(policy, x, a, b, total, shift)
        return x

    reference = run(sides["batch_max"])
    torch.testing.assert_close(run(sides["per_sample"]), reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(run(sides["fused"]), reference, rtol=1e-5, atol=1e-5)
    # interleaved: all sides see the same machine load (each side already ran once above)
    times = interleaved_seconds({name: (lambda fn=fn: run(fn)) for name, fn in sides.items()}, args.repeats,
                                warmup=0)
    result = {"batch": batch, "components": k, "states": args.states, "threads": args.threads,
              "substeps_per_sample_schedule": ours_substeps, "substeps_batch_max_schedule": max_substeps,
              **{f"{name}_median_s": statistics.median(t) for name, t in times.items()},
              **{f"{name}_spread_s": [min(t), max(t)] for name, t in times.items()}}
    result["ratio_of_medians"] = result["per_sample_median_s"] / result["batch_max_median_s"]
    result["fused_over_batch_max"] = result["fused_median_s"] / result["batch_max_median_s"]
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
