"""Policy overhead: a full 128-substep GMFlow rollout vs one DiT-B/2 forward pass, same machine, same run.

    python benchmarks/policy_overhead.py [--batch 8] [--components 8 32] [--repeats 5] [--json out.json]

The paper reports ~15 ms of policy per ~465 ms network evaluation (~3 %, A100, Qwen-Image). Here the network is a
DiT-B/2 (130 M parameters) on 4×32×32 latents, batch 8, and the policy a K-component GM over the same latents rolled
out from σ = 1 to 0 in 128 substeps, both under `torch.inference_mode`. The posterior runs in plain PyTorch ("eager")
and, where available, fused with `torch.compile` ("compiled"); both must give the same rollout. All sides are timed
in one process, interleaved within each repeat (network, then every rollout variant, `--repeats` times): the script
prints medians, the spread (min–max) of each side and of the per-repeat ratio.
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


def interleaved_seconds(sides: dict, repeats: int, warmup: int = 2) -> dict:
    """Per side, the `repeats` times of one call, the sides timed in turn within each repeat (so that both see the
    same machine load); `warmup` untimed calls each first."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


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
    params = sum(p.numel() for p in model.parameters()) / 1e6
    compiled = None
    if not args.no_compile:
        if gmflow.enable_compiled_posterior(True):
            compiled = gmflow._compiled_substep
        else:
            print("torch.compile unavailable; skipping the compiled variant")
    gmflow.enable_compiled_posterior(False)

    def network():
        with torch.inference_mode():
            model(x, t, y)

    def rollout_of(policy, fused):
        def run():
            gmflow._compiled_substep = compiled if fused else None      # the variant, per call
            with torch.inference_mode():
                return rollout(policy, policy.x_src, 1.0, 0.0, total_substeps=args.substeps)
        return run

    sides, outputs = {"network": network}, {}
    for num_components in args.components:
        policy = make_policy(args.batch, num_components, channels, size)
        for mode in ["eager"] + (["compiled"] if compiled is not None else []):
            sides[(num_components, mode)] = rollout_of(policy, mode == "compiled")
            outputs[(num_components, mode)] = sides[(num_components, mode)]()
    times = interleaved_seconds(sides, args.repeats)
    gmflow._compiled_substep = None
    network_median = statistics.median(times["network"])
    results["network_seconds"] = network_median
    results["network_spread_seconds"] = [min(times["network"]), max(times["network"])]
    print(f"DiT-B/2 ({params:.0f} M params) forward, batch {args.batch}, 4x32x32: median {network_median * 1e3:.1f} ms "
          f"(spread {min(times['network']) * 1e3:.1f}–{max(times['network']) * 1e3:.1f} ms, {args.repeats} "
          "interleaved repeats)")
    for key, seconds in times.items():
        if key == "network":
            continue
        num_components, mode = key
        ratios = [100 * r / n for r, n in zip(seconds, times["network"])]     # within each repeat
        row = {"K": num_components, "mode": mode, "rollout_seconds": statistics.median(seconds),
               "rollout_spread_seconds": [min(seconds), max(seconds)],
               "ratio_percent": 100 * statistics.median(seconds) / network_median,
               "ratio_percent_per_repeat_spread": [min(ratios), max(ratios)]}
        if mode == "compiled":
            row["max_abs_diff_vs_eager"] = float((outputs[key] - outputs[(num_components, "eager")]).abs().max())
        results["rows"].append(row)
        print(f"GM K={num_components:<3d} {mode:9s} {args.substeps}-substep rollout: median "
              f"{row['rollout_seconds'] * 1e3:8.1f} ms (spread {min(seconds) * 1e3:.1f}–{max(seconds) * 1e3:.1f}) = "
              f"{row['ratio_percent']:.2f} % of one network evaluation (per repeat {min(ratios):.2f}–"
              f"{max(ratios):.2f} %)" + (f"; max |eager − compiled| = {row['max_abs_diff_vs_eager']:.2e}"
                                         if mode == "compiled" else ""))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
