"""Cost of piflow's input validation (NaN/Inf and range checks at the public entry points) on sampling and on a
π-ID training step, measured in one process with interleaved repeats: checks on vs all `check_finite` calls patched
out. The checks run once per entry point or network evaluation, never per rollout substep, so the difference should
be within the noise.

    python benchmarks/validation_overhead.py [--repeats 7] [--batch 64] [--json out.json]
"""
from __future__ import annotations

import argparse
import importlib
import platform
import statistics
import time
from contextlib import contextmanager

import torch

from piflow.files import write_json
from piflow.model import PiFlow
from piflow.recipes import images
from piflow.recipes.demo import ASSETS

MODULES = [importlib.import_module(f"piflow.{name}") for name in
           ("policies.base", "policies.gmflow", "policies.dx", "rollout", "sampling", "piid", "teachers")]


@contextmanager
def checks_disabled():
    """Replace every module's `check_finite` with a no-op for the duration of the block."""
    originals = {module: module.check_finite for module in MODULES}
    try:
        for module in MODULES:
            module.check_finite = lambda tensor, name: None
        yield
    finally:
        for module, original in originals.items():
            module.check_finite = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="interleaved repeats of each side")
    parser.add_argument("--batch", type=int, default=64, help="samples per batch")
    parser.add_argument("--json", default=None, help="write the results to this file")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher_model, _ = images.load_teacher(str(ASSETS / "digits_dit"))
    teacher = images.make_teacher(teacher_model, teacher_model.config.num_classes)
    from piflow.models.students import PolicyStudent

    student = PolicyStudent(teacher_model, "gmflow", num_components=8, num_timesteps=1000.0)
    pf = PiFlow(student, teacher, policy="gmflow", nfe=4)
    noise = torch.randn(args.batch, 1, 8, 8)
    labels = torch.arange(args.batch) % 10
    data = torch.randn(args.batch, 1, 8, 8).clamp(-1, 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)

    def sample() -> None:
        with torch.no_grad():
            pf.sample(noise, cond=labels)

    def train_step() -> None:
        optimizer.zero_grad()
        pf(data, labels, generator=torch.Generator().manual_seed(0)).backward()
        optimizer.step()

    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": args.batch, "rows": {}}
    for name, fn in (("sample, 4 NFE (GM K=8, digits DiT)", sample), ("π-ID training step", train_step)):
        fn()                                                     # warm-up
        times = {"checks on": [], "checks off": []}
        for _ in range(args.repeats):
            for side in ("checks on", "checks off"):
                if side == "checks off":
                    with checks_disabled():
                        start = time.perf_counter()
                        fn()
                else:
                    start = time.perf_counter()
                    fn()
                times[side].append(time.perf_counter() - start)
        on, off = statistics.median(times["checks on"]), statistics.median(times["checks off"])
        results["rows"][name] = {
            "checks_on_ms": 1e3 * on, "checks_off_ms": 1e3 * off, "ratio": on / off,
            "spread_on_ms": [1e3 * min(times["checks on"]), 1e3 * max(times["checks on"])],
            "spread_off_ms": [1e3 * min(times["checks off"]), 1e3 * max(times["checks off"])]}
        row = results["rows"][name]
        print(f"{name}: checks on {row['checks_on_ms']:.1f} ms (min–max {row['spread_on_ms'][0]:.1f}–"
              f"{row['spread_on_ms'][1]:.1f}), off {row['checks_off_ms']:.1f} ms ({row['spread_off_ms'][0]:.1f}–"
              f"{row['spread_off_ms'][1]:.1f}), ratio {row['ratio']:.3f}")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
