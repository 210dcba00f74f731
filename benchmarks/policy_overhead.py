"""Policy overhead: a full 128-substep GMFlow rollout vs one DiT-B/2 forward pass, same machine, same run.

    python benchmarks/policy_overhead.py [--batch 8] [--components 8 32] [--repeats 5] [--device cpu|cuda]
                                         [--json out.json]

The paper reports ~15 ms of policy per ~465 ms network evaluation (~3 %, A100, Qwen-Image). Here the network is a
DiT-B/2 (130 M parameters) on 4×32×32 latents, batch 8, and the policy a K-component GM over the same latents rolled
out from σ = 1 to 0 in 128 substeps, both under `torch.inference_mode`. Two rollouts: piflow's default ("fused": the
C kernel on the CPU, compiled substeps on CUDA) and plain PyTorch ("eager"); both must give the same rollout.

Next to them, the floors of the rollout's memory traffic, measured in the same run: the bytes one substep reads
(means, Σ_c means², logits, x and x_src) read once per substep, (a) from cache (a sum over exactly those tensors) and
(b) at this machine's streaming memory bandwidth (a sum over a 256 MiB buffer, scaled to the same bytes). All sides
are timed in one process, interleaved within each repeat (`--repeats` times): the script prints medians, the spread
(min–max) of each side and of the per-repeat ratio.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from piflow import kernels
from piflow.files import write_json
from piflow.models import DiT
from piflow.policies import GMFlowPolicy, gmflow
from piflow.rollout import rollout
from timing import interleaved_seconds


def spread(values) -> str:
    return f"median {statistics.median(values) * 1e3:.1f} ms (spread {min(values) * 1e3:.1f}–{max(values) * 1e3:.1f})"


def make_policy(batch: int, num_components: int, channels: int, size: int, seed: int = 0,
                device: str = "cpu") -> GMFlowPolicy:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, num_components, channels, size, size)
    means = torch.randn(shape, generator=gen)
    logweights = torch.log_softmax(torch.randn(batch, num_components, 1, size, size, generator=gen), dim=1)
    logstds = torch.full((batch,), -1.0)
    x_src = torch.randn(batch, channels, size, size, generator=gen)
    return GMFlowPolicy(means.to(device), logstds.to(device), logweights.to(device), x_src.to(device), 1.0)


def substep_bytes(policy: GMFlowPolicy) -> int:
    """What one substep must read: the mixture (means, Σ_c means², logits), the state x and x_src (float32)."""
    return 4 * (policy.means.numel() + policy.means_sq.numel() + policy.logits.numel() + 2 * policy.x_src.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--components", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--substeps", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the network's dtype")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()

    device, channels, size = torch.device(args.device), 4, 32
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "threads": torch.get_num_threads(), "batch": args.batch, "substeps": args.substeps,
               "network_dtype": args.dtype, "rows": []}
    with torch.inference_mode():
        model = DiT.from_preset("DiT-B/2", in_channels=channels, input_size=size, num_classes=1000)
        model = model.to(device=device, dtype=dtype).eval()
        x = torch.randn(args.batch, channels, size, size, device=device, dtype=dtype)
        t = torch.full((args.batch,), 500.0, device=device)
        y = torch.zeros(args.batch, dtype=torch.long, device=device)
    params = sum(p.numel() for p in model.parameters()) / 1e6

    def network():
        with torch.inference_mode():
            model(x, t, y)

    def rollout_of(policy, fused):
        def run():
            with gmflow.fused_rollout(fused), torch.inference_mode():        # the variant, per call
                return rollout(policy, policy.x_src, 1.0, 0.0, total_substeps=args.substeps)
        return run

    stream = torch.randn(64 * 2 ** 20, device=device)                          # 256 MiB
    stream_bytes = stream.numel() * 4
    sides = {"network": network, "stream 256 MiB": lambda: stream.sum()}
    outputs, per_substep_bytes, first_call = {}, {}, {}
    for num_components in args.components:
        policy = make_policy(args.batch, num_components, channels, size, device=args.device)
        for mode in ("fused", "eager"):
            run = rollout_of(policy, mode == "fused")
            start = time.perf_counter()
            outputs[(num_components, mode)] = run()
            sync()
            first_call[(num_components, mode)] = time.perf_counter() - start
            sides[(num_components, mode)] = run
        buffer = torch.cat([policy.means.reshape(-1), policy.means_sq.reshape(-1), policy.logits.reshape(-1),
                            policy.x_src.reshape(-1), policy.x_src.reshape(-1)])
        per_substep_bytes[num_components] = substep_bytes(policy)
        assert buffer.numel() * 4 == per_substep_bytes[num_components]
        sides[(num_components, "floor")] = (lambda b=buffer: [b.sum() for _ in range(args.substeps)])
    times = interleaved_seconds(sides, args.repeats, sync=sync)
    network_median = statistics.median(times["network"])
    stream_seconds = statistics.median(times["stream 256 MiB"])
    results.update(network_seconds=network_median,
                   network_spread_seconds=[min(times["network"]), max(times["network"])],
                   stream_bandwidth_gb_per_s=stream_bytes / stream_seconds / 1e9,
                   kernel_compile_seconds=kernels.compile_seconds)
    print(f"DiT-B/2 ({params:.0f} M params, {args.dtype}) forward, batch {args.batch}, 4x32x32 on {results['device']}: "
          f"{spread(times['network'])}, {args.repeats} interleaved repeats")
    print(f"streaming read bandwidth: {results['stream_bandwidth_gb_per_s']:.1f} GB/s "
          f"({spread(times['stream 256 MiB'])} per 256 MiB)")
    if device.type == "cpu":
        print("fused CPU kernel build: " + ("loaded from the cache" if kernels.compile_seconds is None
                                           else f"{kernels.compile_seconds:.2f} s (once per machine)"))
    for num_components in args.components:
        per_substep = per_substep_bytes[num_components]
        traffic = per_substep * args.substeps
        cache_floor = statistics.median(times[(num_components, "floor")])
        stream_floor = traffic / stream_bytes * stream_seconds
        print(f"GM K={num_components}: {per_substep / 2 ** 20:.2f} MiB per substep; floor of {args.substeps} "
              f"substeps: {cache_floor * 1e3:.1f} ms reading them from cache, {stream_floor * 1e3:.1f} ms at the "
              "streaming bandwidth")
        for mode in ("fused", "eager"):
            seconds = times[(num_components, mode)]
            ratios = [100 * r / n for r, n in zip(seconds, times["network"])]     # within each repeat
            median = statistics.median(seconds)
            row = {"K": num_components, "mode": mode, "rollout_seconds": median,
                   "rollout_spread_seconds": [min(seconds), max(seconds)],
                   "first_call_seconds": first_call[(num_components, mode)],
                   "ratio_percent": 100 * median / network_median,
                   "ratio_percent_per_repeat_spread": [min(ratios), max(ratios)],
                   "substep_mib": per_substep / 2 ** 20, "cache_floor_seconds": cache_floor,
                   "stream_floor_seconds": stream_floor, "times_cache_floor": median / cache_floor,
                   "times_stream_floor": median / stream_floor}
            if mode == "eager":
                row["max_abs_diff_fused_vs_eager"] = float(
                    (outputs[(num_components, "fused")] - outputs[(num_components, "eager")]).abs().max())
            results["rows"].append(row)
            print(f"  {mode:5s} {args.substeps}-substep rollout: {spread(seconds)} = {row['ratio_percent']:.2f} % "
                  f"of one network evaluation (per repeat {min(ratios):.2f}–{max(ratios):.2f} %); "
                  f"{row['times_cache_floor']:.2f}x the cache floor, {row['times_stream_floor']:.2f}x the streaming "
                  f"floor; first call {row['first_call_seconds']:.2f} s"
                  + (f"; max |fused − eager| = {row['max_abs_diff_fused_vs_eager']:.1e}" if mode == "eager" else ""))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
