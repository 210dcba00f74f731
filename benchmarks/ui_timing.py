"""Wall time of one playground generation in `piflow ui`: a bundled 4-NFE image student (digits by default, the README
figure; --model mnist or fashion for the U-Net students), batch 16.

Times the function the page's Generate button calls (`playground.generate` + `playground.render`: teacher 32
Euler steps, student 4 NFE, the recorded x̂0 strip, the images) and, inside it, the student's 4-NFE batch alone.
Prints median and spread of `--repeats` runs (after one warm-up).
    python benchmarks/ui_timing.py --repeats 7 [--model fashion]
"""
import argparse
import platform
import statistics
import time

import torch

from piflow.ui import playground as pg


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--model", default="digits", help="a bundled model, by the start of its label (case-blind)")
    args = parser.parse_args()
    labels = [label for label in pg.BUNDLED if label.lower().startswith(args.model.lower())]
    if len(labels) != 1:
        parser.error(f"--model must start exactly one of {list(pg.BUNDLED)}, got {args.model!r}")
    model = pg.load_bundled(labels[0])
    print(labels[0])
    settings = pg.check_settings(model, 4, 0, 16, None)
    whole, student = [], []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        generation = pg.generate(model, settings)
        pg.render(model, generation)
        if i:
            whole.append(time.perf_counter() - start)
            student.append(generation.student_seconds)
    for name, values in (("generate + render (teacher 32 steps, student 4 NFE, x0 strip)", whole),
                         ("student 4 NFE alone", student)):
        print(f"{name}: median {statistics.median(values):.3f} s, min {min(values):.3f} s, max {max(values):.3f} s "
              f"({len(values)} runs)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")


if __name__ == "__main__":
    main()
