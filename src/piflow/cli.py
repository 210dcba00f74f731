"""The `piflow` command line: demo, train-teacher, distill, sample, evaluate, toy-trajectory, encode-prompts, export,
convert-checkpoint.

Every training command takes ``--config FILE`` (YAML) and ``key=value`` overrides (dotted keys, e.g.
``distill.nfe=4``) and writes its resolved config, metrics JSON and figures into its run directory (``--run-dir``).
A problem with the input (config, data, files, run directory, missing extras: a `piflow.errors.UserError`) or the
environment (missing or unwritable files, a full disk) is printed as one line and exits with status 2 (3 when
training diverged); set ``PIFLOW_TRACEBACK=1`` to see the traceback too. Anything else is a bug and keeps its
traceback. ``PIFLOW_COMPILE=1`` turns on the fused (torch.compile) GM rollout substeps.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from piflow.errors import ConfigError, RunDirError, UserError

SAMPLE_VALUES = ("values are the student's outputs in data units, not clipped: images in about [-1, 1] "
                 "(the training data's scale; latents for `latents` datasets), 2-D points in data coordinates")


def _add_config_args(parser: argparse.ArgumentParser, run_dir_default: Optional[str]) -> None:
    parser.add_argument("--config", "-c", default=None, help="YAML config file (defaults are built in)")
    parser.add_argument("--run-dir", default=run_dir_default, required=run_dir_default is None,
                        help="where config.yaml, checkpoint.safetensors, metrics.json and figures go; an existing run "
                             "there is resumed (default: %(default)s)")
    parser.add_argument("--allow-config-change", action="store_true",
                        help="resume a run even though the config differs from the one it was started with "
                             "(the change is recorded in run.json)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. distill.nfe=4")


def _resolve_training_config(args) -> tuple[str, dict]:
    """(recipe, resolved config) of train-teacher / distill: the YAML file is read once; its ``pipeline`` and
    ``dataset`` (an override wins) pick the recipe — text-to-image, image or 2-D — whose defaults resolve it."""
    from piflow.config import load_config, parse_overrides
    from piflow.files import read_yaml
    from piflow.recipes import images, toy2d
    from piflow.recipes.common import check_dataset

    loaded = read_yaml(args.config) if args.config else {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {args.config} must hold a mapping at the top level")
    overrides = parse_overrides(args.overrides)

    def chosen(key: str):
        return overrides[key] if key in overrides else loaded.get(key)

    if chosen("pipeline") is not None:                  # a diffusers text-to-image base model
        if args.command != "distill":
            raise ConfigError("text-to-image teachers are diffusers pipelines: use `piflow distill pipeline=...`")
        from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS

        recipe, defaults = "t2i", T2I_DISTILL_DEFAULTS
    else:
        toy_defaults = toy2d.TEACHER_DEFAULTS if args.command == "train-teacher" else toy2d.DISTILL_DEFAULTS
        dataset = chosen("dataset") or toy_defaults["dataset"]
        check_dataset(dataset)
        if images.is_image_dataset(dataset):
            recipe = "image"
            defaults = images.IMAGE_TEACHER_DEFAULTS if args.command == "train-teacher" else \
                images.IMAGE_DISTILL_DEFAULTS
        else:
            recipe, defaults = "2d", toy_defaults
    return recipe, load_config(defaults, loaded, args.overrides)


def _cmd_train(args) -> int:
    """train-teacher and distill: resolve the config once, then run the 2-D, image or text-to-image recipe."""
    from piflow.recipes import images, toy2d

    recipe, config = _resolve_training_config(args)
    run_dir = Path(args.run_dir)
    if recipe == "t2i":
        from piflow.recipes.text_to_image import distill_text_to_image

        run = distill_text_to_image
    else:
        module = images if recipe == "image" else toy2d
        run = module.train_teacher if args.command == "train-teacher" else module.distill
    metrics = run(config, run_dir, args.allow_config_change)
    print(toy2d.format_table(metrics["rows"]) if recipe == "2d" else json.dumps(metrics, indent=2))
    print(f"results written to {run_dir}")
    return 0


def _run_kind(run_dir: Path) -> str:
    """"t2i", "image" or "2d" from a run directory's config.yaml."""
    from piflow.files import read_yaml
    from piflow.recipes.images import is_image_dataset
    from piflow.train.run_dir import check_run_dir

    check_run_dir(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} is not a piflow run directory (no config.yaml)")
    config = read_yaml(config_path, "the run's config")
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a mapping")
    if config.get("pipeline") is not None:
        return "t2i"
    return "image" if is_image_dataset(config.get("dataset")) else "2d"


def _run_is_image(run_dir: Path) -> bool:
    kind = _run_kind(run_dir)
    if kind == "t2i":
        raise ConfigError(f"{run_dir} is a text-to-image run: sample it with `piflow sample --run-dir "
                          f"{run_dir} --prompt ...` or load {run_dir / 'adapter'} into a Pi*Pipeline")
    return kind == "image"


def _temperature(value: str):
    """--temperature: 'auto' or a number >= 0, checked by the sampler's own rule (`resolve_temperature`)."""
    from piflow.sampling import resolve_temperature

    try:
        temperature = value if value == "auto" else float(value)
        resolve_temperature(temperature, 1)
    except ValueError:
        raise ConfigError(f"--temperature must be a number >= 0 or 'auto', got {value!r}") from None
    return temperature


def _positive(args, *options: str) -> None:
    """A `ConfigError` for the first of the integer `options` (e.g. "--nfe") that is given and < 1."""
    for option in options:
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")


def _sample_text_to_image(args, run_dir: Path) -> int:
    import torch

    from piflow.recipes.text_to_image import sample_run

    if not args.prompt:
        raise ConfigError("text-to-image runs need --prompt \"...\" (repeatable)")
    out = Path(args.output) if args.output else run_dir / "samples"
    paths = sample_run(run_dir, args.prompt, out, nfe=args.nfe, num_images=args.num_samples or 1,
                       generator=torch.Generator().manual_seed(args.seed), temperature=_temperature(args.temperature),
                       overrides=args.overrides)
    print(f"{len(paths)} images written to {out}")
    return 0


def _cmd_sample(args) -> int:
    import numpy as np
    import torch

    from piflow.progress import progress_bar
    from piflow.recipes import images, plots, toy2d

    run_dir = Path(args.run_dir)
    _positive(args, "--nfe", "--num-samples", "--batch-size")
    if _run_kind(run_dir) == "t2i":
        if args.label is not None:
            raise ConfigError("--label applies to class-conditional image runs; text-to-image runs take --prompt")
        return _sample_text_to_image(args, run_dir)
    if args.prompt:
        raise ConfigError(f"--prompt applies to text-to-image runs; {run_dir} is a 2-D or image run")
    image_run = _run_is_image(run_dir)
    if args.label is not None and not image_run:
        raise ConfigError(f"--label applies to class-conditional image runs; {run_dir} is a 2-D run")
    temperature = _temperature(args.temperature)
    num_samples = args.num_samples or 5000
    out = Path(args.output) if args.output else None
    if out is not None and (out.suffix != ".npy" or out.is_dir() or out.with_suffix(".png").is_dir()):
        raise ConfigError(f"--output must name a .npy file (not a folder), got {out}")
    pf, _ = (images if image_run else toy2d).load_student(run_dir, args.overrides)
    nfe = pf.nfe if args.nfe is None else args.nfe
    out = out or run_dir / f"samples_nfe{nfe}.npy"
    gen = torch.Generator().manual_seed(args.seed)
    if image_run:
        model_config = pf.student.backbone.config
        num_classes = max(model_config.num_classes, 1)
        if args.label is not None and not 0 <= args.label < num_classes:
            raise ConfigError(f"--label must lie in [0, {num_classes}), got {args.label}")
        shape = (model_config.in_channels, *model_config.input_size)
        labels = (torch.full((num_samples,), args.label) if args.label is not None
                  else torch.arange(num_samples) % num_classes)
    else:
        shape, labels = (2,), None
    noise = torch.randn(num_samples, *shape, generator=gen)      # drawn at once: independent of the batch size
    batch = args.batch_size or (256 if image_run else 5000)
    bar = progress_bar(num_samples, "sampling", enabled=num_samples > batch)
    chunks = []
    for start in range(0, num_samples, batch):
        cond = labels[start:start + batch] if labels is not None else None
        chunks.append(pf.sample(noise[start:start + batch], nfe=nfe, cond=cond, temperature=temperature))
        bar.update(len(chunks[-1]))
    bar.close()
    samples = torch.cat(chunks)
    from piflow.files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda handle: np.save(handle, samples.numpy()))        # the data first, then the preview
    if image_run:
        title = f"π-Flow student, {nfe} NFE" + (f", class {args.label}" if args.label is not None else "")
        images.save_image_grid(samples[:100], out.with_suffix(".png"), nrow=10, label=title)
    else:
        plots.plot_sample_panels([(f"student, {nfe} NFE", samples.numpy())], out.with_suffix(".png"))
    print(f"{len(samples)} samples of shape {tuple(samples.shape[1:])} written to {out} (float32; {SAMPLE_VALUES}) "
          f"and a preview to {out.with_suffix('.png')}")
    return 0


def _cmd_evaluate(args) -> int:
    from piflow.config import load_config
    from piflow.files import read_json, write_json
    from piflow.recipes import images, toy2d
    from piflow.train.run_dir import run_lock

    run_dir = Path(args.run_dir)
    image_run = _run_is_image(run_dir)
    figures = run_dir / "evaluation"
    defaults = images.IMAGE_DISTILL_DEFAULTS if image_run else toy2d.DISTILL_DEFAULTS
    num_samples = load_config(defaults, run_dir / "config.yaml", args.overrides)["eval"]["num_samples"]
    with run_lock(run_dir):
        if image_run:
            from piflow.recipes.image_benchmark import evaluate_student_run, format_markdown

            results = evaluate_student_run(run_dir, args.overrides)
            table = format_markdown(results)
        else:
            pf, config = toy2d.load_student(run_dir, args.overrides)
            teacher, _ = toy2d.load_teacher(config["teacher"], config["dataset"])
            results = toy2d.evaluate_methods(teacher, pf, toy2d.load_dataset(config["dataset"]), config["eval"],
                                             figures)
            table = toy2d.format_table(results["rows"])
        metrics_path = run_dir / "metrics.json"
        metrics = read_json(metrics_path, "metrics file") if metrics_path.is_file() else {}
        if not isinstance(metrics, dict) or not isinstance(metrics.get("rows", {}), dict):
            raise ConfigError(f"metrics file {metrics_path} is not a piflow metrics file (a JSON object with rows)")
        for row in results["rows"].values():
            row["num_samples"] = num_samples                            # what each re-measured row is based on
        metrics.setdefault("rows", {}).update(results["rows"])          # new rows added, re-measured rows replaced
        metrics["evaluate"] = {"overrides": list(args.overrides), **{k: v for k, v in results.items() if k != "rows"}}
        write_json(metrics_path, metrics)
    print(table)
    print(f"rows added to {metrics_path}" + ("" if image_run else f"; figures in {figures}/"))
    return 0


def _cmd_demo(args) -> int:
    from piflow.recipes import demo

    run_dir = Path(args.run_dir or ("runs/demo_quick" if args.quick else "runs/demo"))
    demo.run_demo(run_dir, quick=args.quick, train_teachers=args.train_teachers)
    return 0


def _cmd_toy_trajectory(args) -> int:
    import torch

    from piflow.recipes.toy_trajectory import run_toy_trajectory

    _positive(args, "--iters", "--components", "--snapshot-every")
    torch.set_num_threads(1)  # one tiny GM: threading only adds overhead
    metrics = run_toy_trajectory(Path(args.teacher), Path(args.run_dir), args.label, args.iters, args.components,
                                 args.seed, args.snapshot_every)
    print(json.dumps(metrics["rmse_vs_teacher_ode_by_iteration"], indent=2))
    print(f"snapshots written to {Path(args.run_dir) / 'snapshots.png'}")
    return 0


def _cmd_encode_prompts(args) -> int:
    import torch

    from piflow.errors import require
    from piflow.integrations.diffusers.prompts import read_prompt_file, write_prompt_cache
    from piflow.recipes.diffusers_base import DTYPES, from_pretrained, pipeline_architecture

    diffusers = require("diffusers", "piflow encode-prompts")
    _positive(args, "--shard-size", "--max-sequence-length")
    architecture = pipeline_architecture(args.pipeline)          # checked before anything heavy is loaded
    prompts = read_prompt_file(args.prompts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = from_pretrained(diffusers.DiffusionPipeline, args.pipeline, transformer=None, vae=None,
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


def _cmd_convert_checkpoint(args) -> int:
    from piflow.train.checkpoint import LEGACY_CHECKPOINT_NAME, convert_legacy_checkpoint
    from piflow.train.run_dir import run_lock

    path = Path(args.path)
    path = path / LEGACY_CHECKPOINT_NAME if path.is_dir() else path
    with run_lock(path.parent):                  # not while a run in that directory is writing its checkpoint
        target = convert_legacy_checkpoint(path)
    print(f"converted {args.path} to {target}; the old file is kept (delete it once the run resumes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="piflow", description="π-Flow: few-step policy distillation (π-ID).",
        epilog="Errors in the input are printed as one line (exit status 2; 3 when training diverged); "
               "PIFLOW_TRACEBACK=1 adds the traceback.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="2-D and digits end-to-end demo with exact answers; prints comparison tables")
    demo.add_argument("--run-dir", default=None, help="output folder (default: runs/demo, or runs/demo_quick with "
                                                      "--quick)")
    demo.add_argument("--quick", action="store_true", help="fewer iterations (smoke test; trains tiny teachers)")
    demo.add_argument("--train-teachers", action="store_true",
                      help="train the learned teachers instead of loading the bundled checkpoints")
    demo.set_defaults(func=_cmd_demo)

    teacher = sub.add_parser("train-teacher", help="train a flow-matching teacher: 2-D MLP or class-conditional "
                                                   "image DiT (by `dataset`)")
    _add_config_args(teacher, "runs/teacher")
    teacher.set_defaults(func=_cmd_train)

    distill = sub.add_parser("distill", help="distil a teacher (exact GM, a teacher run, or a diffusers pipeline "
                                             "with pipeline=...) into a policy student")
    _add_config_args(distill, "runs/student")
    distill.set_defaults(func=_cmd_train)

    sample = sub.add_parser("sample", help="sample a finished student (any NFE): .npy + PNG preview, or PNGs for "
                                           "text-to-image runs",
                            description=f"Sample a finished `piflow distill` run. 2-D/image runs write a float32 "
                                        f".npy ({SAMPLE_VALUES}) and a PNG preview; text-to-image runs write one PNG "
                                        f"per image.")
    sample.add_argument("--run-dir", required=True, help="a finished `piflow distill` run")
    sample.add_argument("--nfe", type=int, default=None, help="number of steps (default: the training NFE)")
    sample.add_argument("--num-samples", type=int, default=None,
                        help="samples (2-D/image runs, default 5000) or images per prompt (text-to-image, default 1)")
    sample.add_argument("--batch-size", type=int, default=None,
                        help="2-D/image runs: samples generated at once (default: 256 for images, 5000 for 2-D); "
                             "the samples do not depend on it")
    sample.add_argument("--seed", type=int, default=0, help="seed of the noise (default: %(default)s)")
    sample.add_argument("--temperature", default="1.0",
                        help="GM temperature on non-final steps: a number >= 0, or 'auto' (default: %(default)s)")
    sample.add_argument("--output", default=None,
                        help="2-D/image runs: .npy output path (default: <run-dir>/samples_nfe<N>.npy); "
                             "text-to-image: output folder (default: <run-dir>/samples)")
    sample.add_argument("--label", type=int, default=None, help="class label for image runs (default: all classes)")
    sample.add_argument("--prompt", action="append", default=[], help="text-to-image runs: a prompt (repeatable)")
    sample.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides applied when loading the run, e.g. distill.total_substeps=256")
    sample.set_defaults(func=_cmd_sample)

    evaluate = sub.add_parser("evaluate", help="metrics of a student vs the teacher's Euler sampler (2-D and image "
                                               "runs); rows are added to metrics.json")
    evaluate.add_argument("--run-dir", required=True, help="a finished `piflow distill` run")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. eval.student_nfe=[1,2,4,8]")
    evaluate.set_defaults(func=_cmd_evaluate)

    toy = sub.add_parser("toy-trajectory", help="fit one static K=32 GM policy to a single teacher trajectory")
    toy.add_argument("--teacher", required=True, help="an image `piflow train-teacher` run directory")
    toy.add_argument("--run-dir", default="runs/toy_trajectory", help="output folder (default: %(default)s)")
    toy.add_argument("--label", type=int, default=3, help="class label of the trajectory (default: %(default)s)")
    toy.add_argument("--iters", type=int, default=2000, help="optimisation steps (default: %(default)s)")
    toy.add_argument("--components", type=int, default=32, help="GM components K (default: %(default)s)")
    toy.add_argument("--snapshot-every", type=int, default=250,
                     help="iterations between x0 snapshots in snapshots.png (default: %(default)s)")
    toy.add_argument("--seed", type=int, default=0, help="seed of the noise and initialisation (default: %(default)s)")
    toy.set_defaults(func=_cmd_toy_trajectory)

    encode = sub.add_parser("encode-prompts", help="pre-compute prompt embeddings (sharded safetensors cache)")
    encode.add_argument("--pipeline", required=True, help="local folder or hub id of the diffusers pipeline")
    encode.add_argument("--prompts", required=True, help="prompt file, one per line")
    encode.add_argument("--out", required=True, help="cache folder (resumable)")
    encode.add_argument("--negative-prompt", default="", help="cached as the unconditional prompt for CFG")
    encode.add_argument("--shard-size", type=int, default=1000, help="prompts per shard file (default: %(default)s)")
    encode.add_argument("--max-sequence-length", type=int, default=512,
                        help="text tokens kept per prompt (default: %(default)s)")
    encode.add_argument("--dtype", default="fp32", choices=sorted(["bf16", "fp16", "fp32"]),
                        help="dtype of the text encoders and the cached embeddings (default: %(default)s)")
    encode.set_defaults(func=_cmd_encode_prompts)

    export = sub.add_parser("export", help="turn a text-to-image run's checkpoint into a piflow adapter folder")
    export.add_argument("--run-dir", required=True, help="a `piflow distill pipeline=...` run (finished or not)")
    export.add_argument("--out", default=None, help="adapter folder (default: <run-dir>/adapter)")
    export.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    export.set_defaults(func=_cmd_export)

    convert = sub.add_parser("convert-checkpoint",
                             help="convert a checkpoint.pt written by piflow <= 0.1 (a pickle) into the safe format")
    convert.add_argument("path", help="the checkpoint.pt file (or its run directory); only convert files you trust")
    convert.set_defaults(func=_cmd_convert_checkpoint)
    return parser


def _one_line(error: BaseException) -> str:
    """The error's message on one line; OSErrors as "<reason>: <file>" without the "[Errno N]" prefix."""
    from piflow.files import one_line

    if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
        return one_line(error.strerror + (f": {error.filename}" if error.filename else ""))
    return one_line(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # started by torchrun: join the process group
        from piflow.train.distributed import init_distributed

        init_distributed()
    if os.environ.get("PIFLOW_COMPILE") == "1":         # opt-in: fused GM rollout substeps (torch.compile)
        from piflow.policies.gmflow import enable_compiled_posterior

        enable_compiled_posterior(True)
    succeeded = False
    try:
        code = args.func(args)
        succeeded = True
        return code
    except (UserError, OSError) as error:
        # user errors (bad config or values, bad files, run directories, missing extras: `UserError`) and the
        # environment's (missing or unwritable files, full disks: OSError); anything else is a bug: traceback
        if os.environ.get("PIFLOW_TRACEBACK"):
            import traceback

            traceback.print_exc()
        kind = "config error" if isinstance(error, ConfigError) else "error"
        print(f"piflow {args.command}: {kind}: {_one_line(error)}", file=sys.stderr)
        return error.exit_code if isinstance(error, UserError) else 2
    except KeyboardInterrupt:
        print(f"piflow {args.command}: interrupted; run the same command again to resume from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if distributed:                             # leave the process group whatever happened
            from piflow.train.distributed import shutdown

            shutdown(wait_for_others=succeeded)


if __name__ == "__main__":
    sys.exit(main())
