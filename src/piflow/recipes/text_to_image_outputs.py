"""What a text-to-image run gives back: its sample grid (`save_sample_grid`, written at the end of training),
its adapter folder (`export_adapter`, `piflow export`) and samples of its student (`sample_run`, `piflow sample`)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from piflow.config import ConfigError
from piflow.files import write_json
from piflow.integrations.diffusers.loading import base_dtype, default_device, load_base
from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS, lora_student, run_family


@torch.no_grad()
def save_sample_grid(pipe, student, config: dict, path: Path, write: bool = True,
                     family: Optional[str] = None, conditions: Optional[tuple] = None) -> Path:
    """One row per eval NFE, one column per eval prompt (editing runs: per condition of `conditions` = (prompts,
    reference image paths)), from the π-Flow pipeline of the run's family; videos show first/middle/last frames."""
    import numpy as np

    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.prompts import load_reference_images

    from piflow.recipes.plots import pyplot

    family = family or student.architecture.name
    pi_pipe = pipeline_class(family)(**pipe.components)
    if getattr(pipe, "labels", None):    # DiT: the class-name table its __init__ built from id2label (no component)
        pi_pipe.labels = pipe.labels
    pi_pipe.set_progress_bar_config(disable=True)
    pi_pipe.set_piflow_student(student)
    height = int(config["resolution"][0])
    prompts, images = list(config["eval"]["prompts"]), None
    if conditions is not None:      # editing: the first conditions of the run, one column each
        prompts, images = conditions
    rows = []
    for nfe in config["eval"]["nfe"]:
        columns = []
        for index, prompt in enumerate(prompts):
            refs = None if images is None else load_reference_images(images[index])
            out = _generate(pi_pipe, family, [prompt], config, refs, num_inference_steps=int(nfe),
                            temperature=config["eval"]["temperature"], output_type="np",
                            generator=torch.Generator().manual_seed(int(config["eval"]["seed"])))
            frames = out[0]
            # a video's first, middle and last frames side by side
            columns.append(np.concatenate([frames[0], frames[len(frames) // 2], frames[-1]], axis=1)
                           if frames.ndim == 4 else frames)
        rows.append(np.concatenate(columns, axis=1))
    if not write:
        return path
    import textwrap

    plt = pyplot()
    grid = np.concatenate(rows, axis=0)
    fig = plt.figure(figsize=(2 * grid.shape[1] / height, 2 * grid.shape[0] / height + 0.4))
    plt.imshow(np.clip(grid, 0, 1))
    column, row = grid.shape[1] / len(prompts), grid.shape[0] / len(rows)
    # each column labelled with its prompt, each row with its NFE
    plt.xticks([(i + 0.5) * column for i in range(len(prompts))],
               [textwrap.fill(textwrap.shorten(p, 80, placeholder=" …"), 28) for p in prompts], fontsize=6)
    plt.yticks([(j + 0.5) * row for j in range(len(rows))], [f"{nfe} NFE" for nfe in config["eval"]["nfe"]],
               fontsize=7)
    plt.tick_params(length=0)
    plt.title(f"π-Flow student: NFE (rows) × {'conditions' if conditions else 'prompts'} (columns)", fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def _is_piflow_adapter(directory: Path) -> bool:
    from piflow.files import read_json

    try:
        config = read_json(directory / "config.json", "adapter config")
    except (FileNotFoundError, ValueError):
        return False
    return isinstance(config, dict) and "policy_config" in config and "architecture" in config


def export_adapter(run_dir: Path, output: Optional[Path] = None, use_ema: bool = True, layout: str = "piflow") -> Path:
    """Turn a (possibly unfinished) run's checkpoint into an adapter folder (EMA weights by default) in piflow's
    layout or the authors' (``layout="authors"``: their pipelines and ComfyUI-piFlow load it)."""
    from piflow.config import load_config
    from piflow.integrations.diffusers.adapter import save_piflow_adapter
    from piflow.integrations.diffusers.quantization import CUDA_ONLY_BACKENDS
    from piflow.train.checkpoint import CHECKPOINT_NAME, LEGACY_CHECKPOINT_NAME, CheckpointError, load_checkpoint
    from piflow.train.ema import frozen_parameter_names, load_partial_state

    run_dir = Path(run_dir)
    config_path, checkpoint_path = run_dir / "config.yaml", run_dir / CHECKPOINT_NAME
    has_checkpoint = checkpoint_path.is_file() or (run_dir / LEGACY_CHECKPOINT_NAME).is_file()
    if not config_path.is_file() or not has_checkpoint:
        raise ConfigError(f"{run_dir} is not a text-to-image distillation run with a checkpoint "
                          f"(needs config.yaml and {CHECKPOINT_NAME})")
    default = run_dir / ("adapter" if layout == "piflow" else "adapter-authors")
    output = Path(output) if output is not None else default
    if layout != "piflow" and _is_piflow_adapter(output):
        raise ConfigError(f"--out {output} holds a piflow-layout adapter, which --layout {layout} would replace "
                          f"(`piflow sample` reads {run_dir / 'adapter'}); choose another folder (default: {default})")
    if output.resolve() == run_dir.resolve() or (output / "config.yaml").exists() or output.is_file() or (
            output.is_dir() and any(output.iterdir()) and not (output / "export.json").is_file()
            and not _is_piflow_adapter(output)):
        raise ConfigError(f"--out {output} must be a new or empty folder or a previous piflow adapter, not a run "
                          f"directory, a file or another folder with contents (default: {default})")
    config = load_config(T2I_DISTILL_DEFAULTS, config_path)
    if config.get("quantize") in CUDA_ONLY_BACKENDS:
        # bitsandbytes loads only on CUDA; the checkpoint replaces every tensor the export reads, so a float base
        # gives the same adapter
        config = dict(config, quantize=None)
    state = load_checkpoint(checkpoint_path)
    device = torch.device("cpu")
    dtype = base_dtype(config, device)
    _, transformer = load_base(config, device, dtype, transformer_only=True)
    student = lora_student(config, transformer)[0]
    weights = state["ema"]["model"] if use_ema else state["model"]
    try:
        load_partial_state(student, weights, frozen_parameter_names(student))
    except (RuntimeError, KeyError) as error:
        raise CheckpointError(f"checkpoint {checkpoint_path} does not match the run's config: {error}") from None
    try:
        save_piflow_adapter(student, output, layout=layout)
    except ValueError as error:                  # e.g. an SD3 student in the authors' layout
        raise ConfigError(f"--layout {layout}: {error}") from None
    write_json(output / "export.json", {"run_dir": str(run_dir), "step": int(state["step"]),
                                        "weights": "ema" if use_ema else "raw", "layout": layout})
    return output


def _generate(pipe, family: str, prompts: list[str], config: dict, images=None, **kwargs):
    """Images (video families: frames) of a π-Flow pipeline at the run's resolution (and frame count), with the
    reference images of editing families."""
    from piflow.integrations.diffusers.families import get_family

    spec = get_family(family)
    height, width = (int(v) for v in config["resolution"])
    arguments = dict(height=height, width=width, **kwargs)
    if spec.video:
        arguments["num_frames"] = int(config["num_frames"])
    if images is not None:
        arguments["image"] = images
    elif spec.references == "required":
        raise ConfigError(f"{family} is an editing family: give reference images (piflow sample --image PATH)")
    out = pipe(prompt=list(prompts), **arguments)
    return out.frames if spec.video else out.images


SAMPLE_FILES = ("[0-9][0-9][0-9]_[0-9][0-9].png", "[0-9][0-9][0-9]_[0-9][0-9].gif",
                "[0-9][0-9][0-9]_[0-9][0-9].mp4", "prompts.json")       # what `sample_run` writes into its folder


def prepare_sample_folder(output: Path, overwrite: bool) -> None:
    """A sample folder is never half-overwritten: one holding any file is refused (a one-line `ConfigError`)
    unless `overwrite`, which first removes the files of an earlier `sample_run` (and only those)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise ConfigError(f"--output {output} is a file; give a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConfigError(f"--output {output} already holds files (an earlier `piflow sample`?): give a new "
                              f"folder, or --overwrite to replace its samples")
        for pattern in SAMPLE_FILES:
            for path in output.glob(pattern):
                path.unlink()


@torch.no_grad()
def sample_run(run_dir: Path, prompts: list[str], output: Path, nfe: Optional[int] = None, num_images: int = 1,
               generator: Optional[torch.Generator] = None, temperature: Any = "auto", overrides=(),
               images: Optional[list] = None, video_format: str = "gif", fps: int = 16,
               overwrite: bool = False) -> list[Path]:
    """Write PNGs (video families: one .gif or .mp4 per video) for `prompts` with a finished run's adapter in the
    π-Flow pipeline of its base model; `images`: reference image paths of editing runs (shared by the prompts).
    `output` must be empty or new unless `overwrite` (`prepare_sample_folder`)."""
    from piflow.config import load_config
    from piflow.integrations.diffusers.families import get_family
    from piflow.integrations.diffusers.pipelines import pipeline_class
    from piflow.integrations.diffusers.prompts import load_reference_images

    if video_format not in ("gif", "mp4"):
        raise ConfigError(f"video format must be 'gif' or 'mp4', got {video_format!r}")
    prepare_sample_folder(output, overwrite)          # checked before anything is loaded; cleared only if asked
    run_dir = Path(run_dir)
    adapter = run_dir / "adapter"
    if not (adapter / "config.json").is_file():
        raise ConfigError(f"{run_dir} has no adapter yet (finish the run or `piflow export --run-dir {run_dir}`)")
    config = load_config(T2I_DISTILL_DEFAULTS, run_dir / "config.yaml", overrides)
    family = run_family(config)
    spec = get_family(family)
    if images and spec.references == "none":
        raise ConfigError(f"--image applies to editing families; {family} takes no reference images")
    references = load_reference_images(images) if images else None
    device = default_device()
    pipe, _ = load_base(config, device, base_dtype(config, device),
                        pipeline_class=pipeline_class(family))
    pipe.load_piflow_adapter(adapter)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    per_prompt = "num_videos_per_prompt" if spec.video else "num_images_per_prompt"
    outputs = _generate(pipe, family, prompts, config, references, **{per_prompt: num_images},
                        num_inference_steps=nfe or pipe.piflow_student.sampling.get("nfe", 4),
                        temperature=temperature, generator=generator)
    from piflow.video import write_video

    paths = []
    for index, item in enumerate(outputs):
        stem = output / f"{index // num_images:03d}_{index % num_images:02d}"
        if spec.video:
            paths.append(write_video(item, stem.with_suffix(f".{video_format}"), fps=fps))
        else:
            path = stem.with_suffix(".png")
            item.save(path)
            paths.append(path)
    write_json(output / "prompts.json", {"prompts": list(prompts), "images": [str(p) for p in images or []]})
    return paths
