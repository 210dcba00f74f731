"""Policy overhead: a full 128-substep GMFlow rollout vs one DiT-B/2 forward pass, same machine, same run.

    python benchmarks/policy_overhead.py [--batch 8] [--components 8 32] [--repeats 5] [--json out.json]

The paper reports ~15 ms of policy per ~465 ms network evaluation (~3 %, A100, Qwen-Image). Here the network is a
DiT-B/2 (130 M parameters) on 4×32×32 latents, batch 8, and the policy a K-component GM over the same latents rolled
out from σ = 1 to 0 in 128 substeps, both under `torch.inference_mode`. The posterior runs in plain PyTorch ("eager")
and, where available, fused with `torch.compile` ("compiled"); both must give the same rollout.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from piflow.files import write_json
from piflow.models import DiT
from piflow.policies import GMFlowPolicy, gmflow
from piflow.rollout import rollout


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_policy(batch: int, num_components: int, channels: int, size: int, seed: int = 0) -> GMFlowPolicy:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, num_components, channels, size, size)
    means = torch.randn(shape, generator=gen)
    logweights = torch.log_softmax(torch.randn(batch, num_components, 1, size, size, generator=gen), dim=1)
    logstds = torch.full((batch,), -1.0)
    x_src = torch.randn(batch, channels, size, size, generator=gen)
    return GMFlowPolicy(means, logstds, logweights, x_src, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--components", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--substeps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    channels, size = 4, 32
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": args.batch, "substeps": args.substeps, "rows": []}
    with torch.inference_mode():
        model = DiT.from_preset("DiT-B/2", in_channels=channels, input_size=size, num_classes=1000).eval()
        x = torch.randn(args.batch, channels, size, size)
        t = torch.full((args.batch,), 500.0)
        y = torch.zeros(args.batch, dtype=torch.long)
        network = median_seconds(lambda: model(x, t, y), args.repeats)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    results["network_seconds"] = network
    print(f"DiT-B/2 ({params:.0f} M params) forward, batch {args.batch}, 4x32x32: {network * 1e3:.1f} ms")

    modes = ["eager"] + ([] if args.no_compile else ["compiled"])
    for num_components in args.components:
        policy = make_policy(args.batch, num_components, channels, size)
        outputs = {}
        for mode in modes:
            if mode == "compiled" and not gmflow.enable_compiled_posterior(True):
                print("torch.compile unavailable; skipping the compiled variant")
                continue
            if mode == "eager":
                gmflow.enable_compiled_posterior(False)
            with torch.inference_mode():
                run = lambda: rollout(policy, policy.x_src, 1.0, 0.0, total_substeps=args.substeps)  # noqa: E731
                outputs[mode] = run()
                seconds = median_seconds(run, args.repeats, warmup=2)
            row = {"K": num_components, "mode": mode, "rollout_seconds": seconds,
                   "ratio_percent": 100 * seconds / network}
            results["rows"].append(row)
            print(f"GM K={num_components:<3d} {mode:9s} {args.substeps}-substep rollout: {seconds * 1e3:8.1f} ms "
                  f"= {row['ratio_percent']:.2f} % of one network evaluation")
        if len(outputs) == 2:
            diff = float((outputs["eager"] - outputs["compiled"]).abs().max())
            print(f"    max |eager − compiled| = {diff:.2e}")
            results["rows"][-1]["max_abs_diff_vs_eager"] = diff
    gmflow.enable_compiled_posterior(False)
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
