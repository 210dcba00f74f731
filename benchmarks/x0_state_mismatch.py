"""Where the few-step x0-regression student is asked about states it never saw.

    PIFLOW_CACHE_DIR=runs/cache python benchmarks/x0_state_mismatch.py --run-dir runs/claims_mnist/students/x0_nfe4_seed0

The x0-regression student (`piflow.methods.x0`) learns x̂0 at the states of the teacher's own ODE at its grid points,
but samples with DDIM-like steps: from (x, σ) to σ' along the straight line towards x̂0. Even with a perfect x̂0
those steps leave the teacher's ODE: from the noise ε the state at σ' is (1 − σ')·x0 + σ'·ε, while the ODE's state
bends away from that line. For `--rows` trajectories of the run's own teacher bank (read from the cache when the
run computed it there, else recomputed: about 36 min on one core for 4,096 MNIST-sized trajectories), this prints
the student's x̂0 error (RMS per pixel against the ODE endpoint) at each grid point, from the ODE state and from
the straight-line state of the same endpoint and noise, and how far the two states lie apart. One JSON object,
also written to `--out` when given.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

import torch

from piflow.files import write_json
from piflow.methods import METHODS
from piflow.methods.x0 import X0_BANK_STEPS
from piflow.recipes import images


def rms(error: torch.Tensor) -> float:
    """Mean over samples of the per-pixel RMS of `error` (N, ...)."""
    return float(error.flatten(1).square().mean(1).sqrt().mean())


def state_mismatch(run_dir: Path, rows: int = 256) -> dict:
    """{"sigma": [...], "x0_rmse_ode_state": [...], "x0_rmse_line_state": [...], "state_distance": [...]}: per grid
    point of the x0 run in `run_dir`, over the last `rows` trajectories of its teacher bank."""
    student, config = images.load_student(run_dir)
    if config.get("method") != "x0":
        raise SystemExit(f"--run-dir: {run_dir} is a {config.get('method')} run, expected an x0-regression run")
    method = METHODS["x0"](images.distill_setup(config))
    noise, labels, states, endpoints = method.bank()
    if not 0 < rows <= len(noise):
        raise SystemExit(f"--rows: expected 1 to {len(noise)} (the bank size), got {rows}")
    take = torch.arange(len(noise) - rows, len(noise))
    cond = labels[take] if torch.is_tensor(labels) else labels
    result = {"run_dir": str(run_dir), "rows": rows, "sigma": [], "x0_rmse_ode_state": [],
              "x0_rmse_line_state": [], "state_distance": []}
    with torch.no_grad():
        for point, grid in enumerate(method.grid):
            sigma = grid / X0_BANK_STEPS
            sigmas = torch.full((rows,), sigma)
            ode = states[point, take]
            line = (1 - sigma) * endpoints[take] + sigma * noise[take]
            for key, x in (("x0_rmse_ode_state", ode), ("x0_rmse_line_state", line)):
                result[key].append(rms(student.policy(x, sigmas, cond).x0(x, sigmas) - endpoints[take]))
            result["sigma"].append(sigma)
            result["state_distance"].append(rms(ode - line))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished `piflow distill method=x0` run")
    parser.add_argument("--rows", type=int, default=256, help="trajectories of the bank to score (its last ones)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = state_mismatch(args.run_dir, args.rows)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
