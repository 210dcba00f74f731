"""The `piflow` command line: demo, train-teacher, distill, sample, evaluate, toy-trajectory, encode-prompts,
encode-images, export, convert-checkpoint, ui.

Every training command takes ``--config FILE`` (YAML) and ``key=value`` overrides (dotted keys, e.g.
``distill.nfe=4``) and writes its resolved config, metrics JSON and figures into its run directory (``--run-dir``).
A problem with the input (config, data, files, run directory, missing extras: a `piflow.errors.UserError`) or the
environment (missing or unwritable files, a full disk) is printed as one line and exits with status 2 (3 when
training diverged); set ``PIFLOW_TRACEBACK=1`` to see the traceback too. Anything else is a bug and keeps its
traceback. ``PIFLOW_FUSED=0`` turns off the fused GM rollout kernels (plain PyTorch).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from piflow.cli_parser import SAMPLE_VALUES, build_parser, parse_args  # noqa: F401 (build_parser: tests, docs)
from piflow.errors import ConfigError, RunDirError, UserError

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
    """"t2i", "image" or "2d" from a distillation run directory's config.yaml (a teacher run is refused)."""
    from piflow.files import read_json, read_yaml
    from piflow.recipes.images import is_image_dataset
    from piflow.train.run_dir import check_run_dir

    check_run_dir(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise RunDirError(f"{run_dir} is not a piflow run directory (no config.yaml)")
    config = read_yaml(config_path, "the run's config")
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path} must hold a mapping")
    record = run_dir / "run.json"
    if record.is_file() and read_json(record, "run record").get("command") == "train-teacher":
        raise RunDirError(f"{run_dir} is a `piflow train-teacher` run (its own evaluation is in metrics.json and "
                          f"samples.png); sample, evaluate and export take `piflow distill` runs")
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
    """--temperature: 'auto' or a number >= 0, by the sampler's own rule (`parse_temperature`)."""
    from piflow.schedule import parse_temperature

    try:
        temperature = parse_temperature(value)
    except ValueError:
        raise ConfigError(f"--temperature must be a number >= 0 or 'auto', got {value!r}") from None
    return temperature


def _positive(args, *options: str) -> None:
    """A `ConfigError` for the first of the integer `options` (e.g. "--nfe") that is given and < 1, or above its
    cap (`recipes.common.MAX_STEPS` for --nfe, `MAX_SAMPLES` for sample counts)."""
    from piflow.recipes.common import MAX_SAMPLES, MAX_STEPS

    for option in options:
        value = getattr(args, option[2:].replace("-", "_"))
        cap = MAX_STEPS if option in ("--nfe", "--teacher-steps") else \
            MAX_SAMPLES if option in ("--num-samples", "--batch-size", "--per-class") else None
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be >= 1, got {value}")
        if value is not None and cap is not None and value > cap:
            raise ConfigError(f"{option} must be at most {cap}, got {value}")


def _sample_text_to_image(args, run_dir: Path) -> int:
    import torch

    from piflow.recipes.text_to_image_outputs import sample_run

    if not args.prompt:
        raise ConfigError("text-to-image runs need --prompt \"...\" (repeatable)")
    out = Path(args.output) if args.output else run_dir / "samples"
    paths = sample_run(run_dir, args.prompt, out, nfe=args.nfe, num_images=args.num_samples or 1,
                       generator=torch.Generator().manual_seed(args.seed), temperature=_temperature(args.temperature),
                       overrides=args.overrides, images=args.image or None, video_format=args.video_format,
                       overwrite=args.overwrite)
    kind = "videos" if paths and paths[0].suffix in (".gif", ".mp4") else "images"
    print(f"{len(paths)} {kind} written to {out}")
    return 0


def _sample_class_balanced(args, run_dir: Path, image_run: bool, temperature) -> int:
    from piflow.recipes.class_samples import sample_class_balanced

    if not image_run:
        raise ConfigError(f"--per-class applies to class-conditional image runs; {run_dir} is a 2-D run")
    if args.per_class is None:
        raise ConfigError("--teacher-steps and --num-classes go with --per-class N (a class-balanced FID set)")
    if args.label is not None or args.num_samples is not None:
        raise ConfigError("--per-class sets the samples itself (N per class); drop --label / --num-samples")
    _positive(args, "--per-class", "--teacher-steps", "--num-classes", "--batch-size", "--nfe")
    out = Path(args.output) if args.output else run_dir / "fid_samples"
    if out.suffix in (".npy", ".npz", ".png") or out.is_file():
        raise ConfigError(f"--output must name a folder for the PNGs (the .npz is written beside it), got {out}")
    summary = sample_class_balanced(run_dir, out, args.per_class, nfe=args.nfe, teacher_steps=args.teacher_steps,
                                    batch_size=args.batch_size or 64, seed=args.seed, temperature=temperature,
                                    overrides=args.overrides, device=args.device, num_classes=args.num_classes)
    if summary["rank"] == 0:
        print(f"{summary['num_samples']} samples ({summary['what']}; {summary['per_class']} per class, "
              f"{summary['num_classes']} classes) in {summary['folder']}/ and {summary['npz']}")
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
    if args.per_class is not None or args.teacher_steps is not None or args.num_classes is not None:
        return _sample_class_balanced(args, run_dir, image_run, temperature)
    num_samples = args.num_samples or 5000
    out = Path(args.output) if args.output else None
    if out is not None and (out.suffix != ".npy" or out.is_dir() or out.with_suffix(".png").is_dir()):
        raise ConfigError(f"--output must name a .npy file (not a folder), got {out}")
    pf, config = (images if image_run else toy2d).load_student(run_dir, args.overrides)
    nfe = pf.nfe if args.nfe is None else args.nfe
    out = out or run_dir / f"samples_nfe{nfe}.npy"
    gen = torch.Generator().manual_seed(args.seed)
    if image_run:
        shape, num_classes = images.sample_spec(config)
        num_classes = max(num_classes, 1)
        if args.label is not None and not 0 <= args.label < num_classes:
            raise ConfigError(f"--label must lie in [0, {num_classes}), got {args.label}")
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
        chunks.append(pf.sample(noise[start:start + batch], nfe=nfe, cond=cond, temperature=temperature,
                                generator=gen))                 # re-noising methods (DMD2) draw from it
        bar.update(len(chunks[-1]))
    bar.close()
    samples = torch.cat(chunks)
    from piflow.files import atomic_write

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda handle: np.save(handle, samples.numpy()))        # the data first, then the preview
    if image_run:
        title = f"{images.student_label(config)} student, {nfe} NFE" + (
            f", class {args.label}" if args.label is not None else "")
        images.save_image_grid(samples[:100], out.with_suffix(".png"), nrow=10, label=title)
    else:
        plots.plot_sample_panels([(f"student, {nfe} NFE", samples.numpy())], out.with_suffix(".png"))
    print(f"{len(samples)} samples of shape {tuple(samples.shape[1:])} written to {out} (float32; {SAMPLE_VALUES}) "
          f"and a preview to {out.with_suffix('.png')}")
    return 0


def _evaluate_adm(args) -> int:
    """--protocol adm: the ADM evaluator's metrics of a sample batch against a reference batch."""
    from piflow.eval.adm import INCEPTION_WEIGHTS_URL, adm_metrics
    from piflow.files import read_json, write_json
    from piflow.train.run_dir import run_lock

    for option in ("samples", "reference", "inception_weights"):
        if getattr(args, option) is None:
            hint = f" (download {INCEPTION_WEIGHTS_URL})" if option == "inception_weights" else ""
            raise ConfigError(f"--protocol adm needs --{option.replace('_', '-')}{hint}")
    if args.overrides:
        raise ConfigError(f"--protocol adm takes no key=value overrides, got {' '.join(args.overrides)}")
    _positive(args, "--batch-size")
    samples = Path(args.samples)
    metrics = adm_metrics(samples, Path(args.reference), Path(args.inception_weights), batch_size=args.batch_size,
                          device=args.device)
    record = {"samples": str(samples), "reference": str(args.reference), **metrics}
    out = Path(args.json) if args.json else samples.with_name(samples.name.removesuffix(".npz") + ".adm.json")
    write_json(out, record)
    if args.run_dir is not None:
        run_dir = Path(args.run_dir)
        _run_is_image(run_dir)
        with run_lock(run_dir):
            path = run_dir / "metrics.json"
            stored = read_json(path, "metrics file") if path.is_file() else {}
            stored.setdefault("adm", {})[samples.name] = record
            write_json(path, stored)
    print(" ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                   for key, value in metrics.items()))
    print(f"written to {out}" + (f" and {Path(args.run_dir) / 'metrics.json'}" if args.run_dir else ""))
    return 0


def _cmd_evaluate(args) -> int:
    from piflow.config import load_config
    from piflow.files import read_json, write_json
    from piflow.methods import student_name
    from piflow.recipes import images, toy2d
    from piflow.recipes.common import check_settings
    from piflow.train.run_dir import run_lock

    if args.protocol == "adm":
        return _evaluate_adm(args)
    if args.run_dir is None:
        raise ConfigError("evaluate needs --run-dir (a finished `piflow distill` run), or --protocol adm with "
                          "--samples/--reference/--inception-weights")
    run_dir = Path(args.run_dir)
    image_run = _run_is_image(run_dir)
    figures = run_dir / "evaluation"
    defaults = images.IMAGE_DISTILL_DEFAULTS if image_run else toy2d.DISTILL_DEFAULTS
    config = load_config(defaults, run_dir / "config.yaml", args.overrides)
    check_settings(config)                           # eval.student_nfe=[0], eval.num_samples=0: one line, up front
    num_samples = config["eval"]["num_samples"]
    with run_lock(run_dir):
        if image_run:
            from piflow.recipes.image_benchmark import evaluate_student_run, format_markdown

            results = evaluate_student_run(run_dir, args.overrides)
            table = format_markdown(results)
        else:
            pf, config = toy2d.load_student(run_dir, args.overrides)
            teacher, _ = toy2d.load_teacher(config["teacher"], config["dataset"])
            results = toy2d.evaluate_methods(teacher, pf, toy2d.load_dataset(config["dataset"]), config["eval"],
                                             figures, student_name(config))
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
    from piflow.integrations.diffusers.loading import DTYPES, from_pretrained, pipeline_architecture, pipeline_family
    from piflow.integrations.diffusers.prompts import read_condition_source, write_prompt_cache

    diffusers = require("diffusers", "piflow encode-prompts")
    _positive(args, "--shard-size", "--max-sequence-length")
    architecture = pipeline_architecture(args.pipeline)          # checked before anything heavy is loaded
    prompts, images = read_condition_source(architecture, args.prompts, args.conditions,
                                            options=("--prompts ", "--conditions "))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    denoiser = pipeline_family(args.pipeline).denoiser          # not loaded: "transformer" or "unet"
    parts = {denoiser: None} if images is not None else {denoiser: None, "vae": None}   # VAE: references
    pipe = from_pretrained(diffusers.DiffusionPipeline, args.pipeline, **parts, torch_dtype=DTYPES[args.dtype])
    pipe.to(device)
    out = write_prompt_cache(pipe, architecture, prompts, args.out, args.negative_prompt, args.shard_size,
                             args.max_sequence_length, images=images)
    what = "conditions (text embeddings + reference latents)" if images is not None else "prompt embeddings"
    print(f"{len(prompts)} {what} ({architecture}) written to {out}")
    return 0


def _cmd_encode_images(args) -> int:
    import torch

    from piflow.data import encode_images as encoding
    from piflow.errors import require
    from piflow.train.distributed import from_environment

    _positive(args, "--resolution", "--batch-size", "--shard-size")
    if args.resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {args.resolution}")
    if args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder")
    require("PIL", "piflow encode-images")
    require("diffusers", "piflow encode-images")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu)")
    encoding.vae_location(args.vae, "--vae")                     # a local folder that is not there: before the scan
    class_index = encoding.read_class_index(args.class_index, "--class-index") if args.class_index else None
    if args.images is not None:
        source = encoding.scan_image_folder(args.images, class_index, "--images")
    else:
        source = encoding.scan_tar_shards(encoding.expand_shard_list(args.shards, "--shards"), class_index,
                                          "--shards")
    info = from_environment()
    use_cuda = args.device == "cuda" or (args.device is None and torch.cuda.is_available())
    device = torch.device("cuda", info.local_rank) if use_cuda else torch.device("cpu")
    vae_name = str(Path(args.vae).expanduser().resolve()) if Path(args.vae).expanduser().exists() else args.vae
    vae = encoding.load_vae(args.vae, device, "--vae")
    if source.empty_classes:
        print(f"piflow encode-images: note: {len(source.empty_classes)} class folders hold no images (their labels "
              f"are kept): {list(source.empty_classes[:5])}", file=sys.stderr)
    result = encoding.encode_images(source, out, vae, resolution=args.resolution, vae_name=vae_name,
                                    batch_size=args.batch_size, shard_size=args.shard_size, flip=args.flip,
                                    store_std=args.store_std, dtype=args.dtype, workers=args.workers,
                                    dist_info=info)
    for note in result.notes:
        print(f"piflow encode-images: note: {note}", file=sys.stderr)
    work = f"this call encoded {len(result.written)} shards and kept {len(result.kept)}"
    if result.index_written:
        print(f"{encoding.index_summary(out)} written to {out} ({work}; index.json lists them)")
    else:
        print(f"rank {result.rank}/{result.world_size}: {work} in {out}; index.json follows once every shard exists")
    return 0


def _cmd_export(args) -> int:
    from piflow.recipes.text_to_image_outputs import export_adapter

    run_dir = Path(args.run_dir)
    if (run_dir / "config.yaml").is_file() and _run_kind(run_dir) != "t2i":
        raise ConfigError(f"export writes the adapter of a text-to-image run; {run_dir} is a 2-D or image run, whose "
                          f"student is {run_dir / 'student.safetensors'} (sample it with `piflow sample`)")
    if args.push_to_hub and args.no_card:
        raise ConfigError("--push-to-hub uploads the adapter with its model card; drop --no-card")
    if args.push_to_hub and args.layout != "piflow":
        raise ConfigError("--push-to-hub uploads piflow-layout adapters (their model card's usage snippet loads "
                          "them); export --layout authors separately")
    out = export_adapter(Path(args.run_dir), Path(args.out) if args.out else None, use_ema=not args.raw,
                         layout=args.layout)
    print(f"adapter written to {out}")
    if not args.no_card and args.layout == "piflow":
        from piflow.integrations.diffusers.hub import push_to_hub, write_model_card

        card = write_model_card(out, Path(args.run_dir), repo_id=args.push_to_hub, base_model=args.base_model)
        print(f"model card written to {card}")
        if args.push_to_hub:
            url = push_to_hub(out, args.push_to_hub, private=args.private)
            print(f"uploaded to {args.push_to_hub}: {url}")
    return 0


def _convert_teacher(args, path: Path) -> int:
    from piflow.models.imported import import_teacher

    _positive(args, "--num-heads", "--input-size")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose a new folder")
    model = import_teacher(path, args.layout, args.weights, args.num_heads, args.input_size)
    model.save_pretrained(out)
    config = model.config
    print(f"{path} ({args.layout}, {args.weights} weights) → {out}: DiT {config.depth} blocks × {config.hidden_size}, "
          f"{config.num_heads} heads, patch {config.patch_size}, {config.in_channels}×{config.input_size[0]}² "
          f"latents, {config.num_classes} classes (+ null class {config.num_classes}), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; use it as teacher={out}")
    return 0


def _cmd_convert_checkpoint(args) -> int:
    from piflow.train.checkpoint import LEGACY_CHECKPOINT_NAME, convert_legacy_checkpoint
    from piflow.train.run_dir import run_lock

    path = Path(args.path)
    if args.out is not None:
        return _convert_teacher(args, path)
    path = path / LEGACY_CHECKPOINT_NAME if path.is_dir() else path
    with run_lock(path.parent):                  # not while a run in that directory is writing its checkpoint
        target = convert_legacy_checkpoint(path)
    print(f"converted {args.path} to {target}; the old file is kept (delete it once the run resumes)")
    return 0


def _cmd_ui(args) -> int:
    from piflow.errors import require

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port must lie in [1, 65535], got {args.port}")
    if args.adapter and not args.pipeline:
        raise ConfigError("--adapter needs --pipeline (the diffusers pipeline of its base model)")
    require("gradio", "piflow ui")
    _check_port_free(args.host, args.port)
    pipeline, adapter, student_runs = args.pipeline, args.adapter, []
    for run in map(Path, args.run_dir):
        if _run_kind(run) == "t2i":
            if pipeline is not None:
                raise ConfigError("give one text-to-image model: one text-to-image --run-dir, or --pipeline/--adapter")
            from piflow.ui.text_to_image import adapter_of_run

            pipeline, adapter = adapter_of_run(run)
        else:
            student_runs.append(run)
    from piflow.ui.app import run_ui

    print(f"piflow ui: serving on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    run_ui(student_runs, pipeline, adapter, port=args.port, host=args.host)
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A `ConfigError` naming --port when something already listens on host:port (before Gradio starts)."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(f"--port {port} on {host} is not available ({error.strerror or error}); choose "
                              f"another --port") from None


# the handler each sub-parser of `piflow.cli_parser` names (train-teacher and distill share "train")
COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "sample": _cmd_sample, "evaluate": _cmd_evaluate,
            "toy_trajectory": _cmd_toy_trajectory, "encode_prompts": _cmd_encode_prompts,
            "encode_images": _cmd_encode_images, "export": _cmd_export,
            "convert_checkpoint": _cmd_convert_checkpoint, "ui": _cmd_ui}


def _one_line(error: BaseException) -> str:
    """The error's message on one line; OSErrors as "<reason>: <file>" without the "[Errno N]" prefix."""
    from piflow.files import one_line

    if isinstance(error, OSError) and not isinstance(error, UserError) and error.strerror:
        return one_line(error.strerror + (f": {error.filename}" if error.filename else ""))
    return one_line(error)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # started by torchrun: join the process group
        from piflow.train.distributed import init_distributed

        init_distributed()
    if os.environ.get("PIFLOW_FUSED") == "0":           # opt-out: plain-PyTorch GM rollouts
        from piflow.policies.gmflow import set_fused_rollout

        set_fused_rollout(False)
    succeeded = False
    try:
        code = COMMANDS[args.handler](args)
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
