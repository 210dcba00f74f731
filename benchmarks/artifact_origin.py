"""At which step of a few-step π-ID image student a sample's defects form: for each intermediate state of the
student's own trajectory, the student's x̂0 there, the teacher's x̂0 (x − σ·u) at the same state, and the
teacher's own 32-step ODE from that state. A defect that the teacher's ODE from step k's state still draws is
committed by then; one that only the student's x̂0 draws is the student's error at that step.

    python benchmarks/artifact_origin.py --claims-run runs/claims_mnist \
        --student runs/claims_mnist/students/piid_nfe4_seed0 --out origin.png

Reads the claims run's evaluation bank (its first --num noises and labels, the columns of the claims figures) and
a π-ID student run of the same teacher (a claims or settings-sweep student); writes one PNG with labelled rows.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from piflow.files import load_safetensors
from piflow.recipes import images
from piflow.recipes.plots import plot_image_rows
from piflow.sampling import FlowMapSDESchedule, euler_sample

TEACHER_STEPS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--claims-run", required=True, help="a claims run directory (its eval_bank.safetensors)")
    parser.add_argument("--student", required=True, help="a finished π-ID student run directory")
    parser.add_argument("--nfe", type=int, default=4)
    parser.add_argument("--num", type=int, default=20, help="samples (columns), the first of the bank")
    parser.add_argument("--out", default="artifact_origin.png")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.nfe < 2 or args.num < 1:
        parser.error(f"--nfe must be >= 2 and --num >= 1, got {args.nfe} and {args.num}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = Path(args.claims_run)
    bank = load_safetensors(run / "eval_bank.safetensors", "the claims run's evaluation bank")
    noise, labels = bank["noise_a"][:args.num], bank["labels_a"][:args.num]
    pf, _ = images.load_student(Path(args.student))
    schedule = FlowMapSDESchedule(pf.settings.shift, pf.settings.final_step_size_scale)
    schedule.set_timesteps(args.nfe)
    rows = []
    with torch.no_grad():
        final, trajectory = pf.sample(noise, nfe=args.nfe, cond=labels, return_trajectory=True)
        for k in range(1, args.nfe):
            x, sigma = trajectory[k], float(schedule.sigmas[k])
            sigmas = torch.full((args.num,), sigma)
            rows.append((f"student x̂0 at its own state, σ = {sigma:.2f} (step {k + 1})",
                         pf.policy(x, sigmas, labels).x0(x, sigmas)))
            rows.append(("teacher x̂0 = x − σ·u at the same state", x - sigma * pf.teacher(x, sigmas, labels)))
            rows.append((f"teacher {TEACHER_STEPS}-step ODE from that state",
                         euler_sample(pf.teacher, x, TEACHER_STEPS, labels, sigma_start=sigma)))
        rows.append((f"student, {args.nfe} NFE", final))
        rows.append((f"teacher {TEACHER_STEPS} steps from the same noise",
                     euler_sample(pf.teacher, noise, TEACHER_STEPS, labels)))
    plot_image_rows(rows, Path(args.out), ncol=args.num, title=f"{Path(args.student).name}: where its samples' "
                    "defects form (same noise and class in each column)")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
