"""The `piflow` command line: demo, train-teacher, distill, sample, evaluate, toy-trajectory, encode-prompts, export.

Every command takes ``--config FILE`` (YAML) and ``key=value`` overrides (dotted keys, e.g. ``distill.nfe=4``) and
writes its resolved config, metrics JSON and figures into its run directory (``--run-dir``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from piflow.config import ConfigError


def _add_config_args(parser: argparse.ArgumentParser, run_dir_default: Optional[str]) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (defaults are built in)")
    parser.add_argument("--run-dir", default=run_dir_default, required=run_dir_default is None,
                        help="where config.yaml, checkpoints, metrics.json and figures go")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.nfe=4")


def _config_value(args, key: str):
    """A top-level config value the run will use (last override wins over the config file), or None if unset."""
    import yaml

    from piflow.config import parse_overrides

    value = parse_overrides(args.overrides).get(key)
    if value is None and args.config and Path(args.config).is_file():
        loaded = yaml.safe_load(Path(args.config).read_text()) or {}
        value = loaded.get(key) if isinstance(loaded, dict) else None
    return value


def _cmd_train(args) -> int:
    """train-teacher and distill: resolve the config, run the 2-D, image or text-to-image recipe."""
    from piflow.config import load_config
    from piflow.recipes import images, toy2d

    if _config_value(args, "pipeline") is not None:   # a diffusers text-to-image base model
        if args.command != "distill":
            raise ConfigError("text-to-image teachers are diffusers pipelines: use `piflow distill pipeline=...`")
        from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS, distill_text_to_image

        metrics = distill_text_to_image(load_config(T2I_DISTILL_DEFAULTS, args.config, args.overrides),
                                        Path(args.run_dir))
        print(json.dumps(metrics, indent=2))
    elif images.is_image_dataset(_config_value(args, "dataset")):
        defaults, run = {"train-teacher": (images.IMAGE_TEACHER_DEFAULTS, images.train_teacher),
                         "distill": (images.IMAGE_DISTILL_DEFAULTS, images.distill)}[args.command]
        metrics = run(load_config(defaults, args.config, args.overrides), Path(args.run_dir))
        print(json.dumps(metrics, indent=2))
    else:
        defaults, run = {"train-teacher": (toy2d.TEACHER_DEFAULTS, toy2d.train_teacher),
                         "distill": (toy2d.DISTILL_DEFAULTS, toy2d.distill)}[args.command]
        metrics = run(load_config(defaults, args.config, args.overrides), Path(args.run_dir))
        print(toy2d.format_table(metrics["rows"]))
    print(f"results written to {args.run_dir}")
    return 0


def _run_kind(run_dir: Path) -> str:
    """"t2i", "image" or "2d" from a run directory's config.yaml."""
    import yaml

    from piflow.recipes.images import is_image_dataset

    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir} is not a piflow run directory (no config.yaml)")
    config = yaml.safe_load(config_path.read_text()) or {}
    if config.get("pipeline") is not None:
        return "t2i"
    return "image" if is_image_dataset(config.get("dataset")) else "2d"


def _run_is_image(run_dir: Path) -> bool:
    kind = _run_kind(run_dir)
    if kind == "t2i":
        raise ConfigError(f"{run_dir} is a text-to-image run: sample it with `piflow sample --run-dir "
                          f"{run_dir} --prompt ...` or load {run_dir / 'adapter'} into a Pi*Pipeline")
    return kind == "image"


def _sample_text_to_image(args, run_dir: Path) -> int:
    import torch

    from piflow.recipes.text_to_image import sample_run

    if not args.prompt:
        raise ConfigError("text-to-image runs need --prompt \"...\" (repeatable)")
    temperature = args.temperature if args.temperature == "auto" else float(args.temperature)
    out = Path(args.output) if args.output else run_dir / "samples"
    paths = sample_run(run_dir, args.prompt, out, nfe=args.nfe, num_images=args.num_samples or 1,
                       generator=torch.Generator().manual_seed(args.seed), temperature=temperature,
                       overrides=args.overrides)
    print(f"{len(paths)} images written to {out}")
    return 0


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from piflow.recipes import images, plots, toy2d

    run_dir = Path(args.run_dir)
    if _run_kind(run_dir) == "t2i":
        return _sample_text_to_image(args, run_dir)
    image_run = _run_is_image(run_dir)
    args.num_samples = args.num_samples or 5000
    pf, _ = (images if image_run else toy2d).load_student_pipeline(run_dir, args.overrides)
    nfe = pf.nfe if args.nfe is None else args.nfe
    gen = torch.Generator().manual_seed(args.seed)
    temperature = args.temperature if args.temperature == "auto" else float(args.temperature)
    out = Path(args.output) if args.output else run_dir / f"samples_nfe{nfe}.npy"
    if image_run:
        model_config = pf.student.backbone.config
        num_classes = max(model_config.num_classes, 1)
        noise = torch.randn(args.num_samples, model_config.in_channels, *model_config.input_size, generator=gen)
        labels = (torch.full((args.num_samples,), args.label) if args.label is not None
                  else torch.arange(args.num_samples) % num_classes)
        samples = pf.sample(noise, nfe=nfe, cond=labels, temperature=temperature)
        images.save_image_grid(samples[:100], out.with_suffix(".png"), nrow=10)
        samples = samples.numpy()
    else:
        samples = pf.sample(torch.randn(args.num_samples, 2, generator=gen), nfe=nfe, temperature=temperature).numpy()
        plots.plot_sample_panels([(f"student, {nfe} NFE", samples)], out.with_suffix(".png"))
    np.save(out, samples)
    print(f"{len(samples)} samples written to {out} (and {out.with_suffix('.png')})")
    return 0


def _cmd_evaluate(args) -> int:
    from piflow.data import make_toy_dataset
    from piflow.recipes import toy2d

    run_dir = Path(args.run_dir)
    if _run_is_image(run_dir):
        from piflow.recipes.image_benchmark import evaluate_student_run, format_markdown

        print(format_markdown(evaluate_student_run(run_dir, args.overrides)))
        return 0
    pf, config = toy2d.load_student_pipeline(run_dir, args.overrides)
    teacher, _ = toy2d.load_teacher(config["teacher"], config["dataset"])
    metrics = toy2d.evaluate_methods(teacher, pf, make_toy_dataset(config["dataset"]), config["eval"], run_dir)
    (run_dir / "evaluation.json").write_text(json.dumps(metrics, indent=2))
    print(toy2d.format_table(metrics["rows"]))
    return 0


def _cmd_demo(args) -> int:
    from piflow.recipes import demo

    demo.run_demo(Path(args.run_dir), quick=args.quick, train_teachers=args.train_teachers)
    return 0


def _cmd_toy_trajectory(args) -> int:
    import torch

    from piflow.recipes.toy_trajectory import run_toy_trajectory

    torch.set_num_threads(1)  # one tiny GM: threading only adds overhead

    metrics = run_toy_trajectory(Path(args.teacher), Path(args.run_dir), args.label, args.iters, args.components,
                                 args.seed, args.snapshot_every)
    print(json.dumps(metrics["rmse_vs_teacher_ode_by_iteration"], indent=2))
    print(f"snapshots written to {Path(args.run_dir) / 'snapshots.png'}")
    return 0


def _cmd_encode_prompts(args) -> int:
    import diffusers
    import torch

    from piflow.integrations.diffusers.prompts import read_prompt_file, write_prompt_cache
    from piflow.recipes.text_to_image import DTYPES, pipeline_architecture

    architecture = pipeline_architecture(args.pipeline)          # checked before anything heavy is loaded
    prompts = read_prompt_file(args.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = diffusers.DiffusionPipeline.from_pretrained(args.pipeline, transformer=None, vae=None,
                                                       torch_dtype=DTYPES[args.dtype])
    pipe.to(device)
    out = write_prompt_cache(pipe, architecture, prompts, args.out, args.negative_prompt, args.shard_size,
                             args.max_sequence_length)
    print(f"{len(prompts)} prompt embeddings ({architecture}) written to {out}")
    return 0


def _cmd_export(args) -> int:
    from piflow.recipes.text_to_image import export_adapter

    out = export_adapter(Path(args.run_dir), Path(args.out) if args.out else None, use_ema=not args.raw)
    print(f"adapter written to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="piflow", description="π-Flow: few-step policy distillation (π-ID).")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="2-D end-to-end demo with exact answers; prints a comparison table")
    demo.add_argument("--run-dir", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="fewer iterations (smoke test; trains tiny teachers)")
    demo.add_argument("--train-teachers", action="store_true",
                      help="train the learned teachers instead of loading the bundled checkpoints")
    demo.set_defaults(func=_cmd_demo)

    teacher = sub.add_parser("train-teacher", help="train a 2-D flow-matching MLP teacher")
    _add_config_args(teacher, "runs/teacher")
    teacher.set_defaults(func=_cmd_train)

    distill = sub.add_parser("distill", help="distil a teacher (exact GM or a teacher run) into a policy student")
    _add_config_args(distill, "runs/student")
    distill.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="sample a trained student (any NFE)")
    sample.add_argument("--run-dir", required=True, help="a finished `piflow distill` run")
    sample.add_argument("--nfe", type=int, default=None, help="number of steps (default: the training NFE)")
    sample.add_argument("--num-samples", type=int, default=None,
                        help="samples (2-D/image runs, default 5000) or images per prompt (text-to-image, default 1)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--temperature", default="1.0", help="GM temperature on non-final steps, or 'auto'")
    sample.add_argument("--output", default=None, help=".npy output path")
    sample.add_argument("--label", type=int, default=None, help="class label for image runs (default: all classes)")
    sample.add_argument("--prompt", action="append", default=[], help="text-to-image runs: a prompt (repeatable)")
    sample.add_argument("overrides", nargs="*", metavar="key=value")
    sample.set_defaults(func=_cmd_sample)

    evaluate = sub.add_parser("evaluate", help="metrics of a student vs the teacher's Euler sampler")
    evaluate.add_argument("--run-dir", required=True, help="a finished `piflow distill` run")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.student_nfe=[1,2,4,8]")
    evaluate.set_defaults(func=_cmd_evaluate)

    toy = sub.add_parser("toy-trajectory", help="fit one static K=32 GM policy to a single teacher trajectory")
    toy.add_argument("--teacher", required=True, help="an image `piflow train-teacher` run directory")
    toy.add_argument("--run-dir", default="runs/toy_trajectory")
    toy.add_argument("--label", type=int, default=3, help="class label of the trajectory")
    toy.add_argument("--iters", type=int, default=2000)
    toy.add_argument("--components", type=int, default=32)
    toy.add_argument("--snapshot-every", type=int, default=250)
    toy.add_argument("--seed", type=int, default=0)
    toy.set_defaults(func=_cmd_toy_trajectory)

    encode = sub.add_parser("encode-prompts", help="pre-compute prompt embeddings (sharded safetensors cache)")
    encode.add_argument("--pipeline", required=True, help="local folder or hub id of the diffusers pipeline")
    encode.add_argument("--prompts", required=True, help="prompt file, one per line")
    encode.add_argument("--out", required=True, help="cache folder (resumable)")
    encode.add_argument("--negative-prompt", default="", help="cached as the unconditional prompt for CFG")
    encode.add_argument("--shard-size", type=int, default=1000)
    encode.add_argument("--max-sequence-length", type=int, default=512)
    encode.add_argument("--dtype", default="fp32", choices=sorted(["bf16", "fp16", "fp32"]))
    encode.set_defaults(func=_cmd_encode_prompts)

    export = sub.add_parser("export", help="turn a text-to-image run's checkpoint into a piflow adapter folder")
    export.add_argument("--run-dir", required=True, help="a `piflow distill pipeline=...` run (finished or not)")
    export.add_argument("--out", default=None, help="adapter folder (default: <run-dir>/adapter)")
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    export.set_defaults(func=_cmd_export)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import os

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # started by torchrun: join the process group
        from piflow.train.distributed import init_distributed

        init_distributed()
    try:
        code = args.func(args)
        if distributed:
            from piflow.train.distributed import shutdown

            shutdown()
        return code
    except ConfigError as error:
        print(f"piflow {args.command}: config error: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError, ImportError) as error:  # bad values, missing data or extras
        print(f"piflow {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
