"""The text-to-image / editing tab of `piflow ui`, without Gradio: a `Pi*Pipeline` with a loaded adapter.

The pipeline is loaded the way `piflow sample` loads a run's (`piflow.integrations.diffusers.loading`: components
only from diffusers/transformers, safetensors weights only), in the π-Flow pipeline class of its family, and gets the
adapter with `load_piflow_adapter`. A request is checked before anything runs (size a multiple of the model's patch,
steps 1–8, temperature, seed, reference images only for editing families); `generate` returns the image and the
settings that reproduce it.
"""
from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from piflow.errors import ConfigError
from piflow.schedule import parse_temperature
from piflow.ui.playground import MAX_NFE, MAX_SEED, whole_number

MAX_SIDE = 4096


@dataclass
class LoadedPipeline:
    """A π-Flow pipeline with its adapter; `multiple`: heights and widths must be multiples of it."""

    pipe: Any
    family: Any                       # piflow.integrations.diffusers.families.Family
    pipeline: str
    adapter: str
    multiple: int
    default_size: tuple[int, int]     # (height, width)
    default_steps: int
    takes_negative_prompt: bool

    @property
    def takes_references(self) -> bool:
        return self.family.references != "none"


def adapter_of_run(run_dir: Union[str, Path]) -> tuple[str, str]:
    """(pipeline, adapter folder) of a `piflow distill pipeline=...` run directory."""
    from piflow.config import load_config
    from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS

    run_dir = Path(run_dir)
    config = load_config(T2I_DISTILL_DEFAULTS, run_dir / "config.yaml")
    return str(config["pipeline"]), str(run_dir / "adapter")


def load_pipeline(pipeline: str, adapter: str) -> LoadedPipeline:
    """The π-Flow pipeline of `pipeline` (a diffusers folder or Hub id) with the adapter folder `adapter`; a missing
    argument, folder or file is a one-line `UserError`/`OSError`."""
    import inspect

    import torch

    from piflow.errors import require

    pipeline, adapter = (pipeline or "").strip(), (adapter or "").strip()
    if not pipeline:
        raise ConfigError("pipeline: give a diffusers pipeline folder (or Hub id) of the adapter's base model")
    if not adapter:
        raise ConfigError("adapter: give the folder of a π-Flow adapter (`piflow export` writes <run-dir>/adapter)")
    require("diffusers", "the text-to-image tab")
    from piflow.integrations.diffusers.adapter import resolve_adapter_dir
    from piflow.integrations.diffusers.loading import default_device, from_pretrained, pipeline_family, size_multiple
    from piflow.integrations.diffusers.pipelines import pipeline_class

    directory = resolve_adapter_dir(adapter)
    if not (directory / "config.json").is_file():
        raise ConfigError(f"adapter: {directory} is not a π-Flow adapter folder (no config.json)")
    family = pipeline_family(pipeline)
    if family.video:
        raise ConfigError(f"pipeline: {family.name} makes videos; `piflow ui` shows images (use `piflow sample`)")
    device = default_device()
    pipe = from_pretrained(pipeline_class(family.name), pipeline, torch_dtype=torch.bfloat16 if device.type == "cuda"
                           else torch.float32)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_piflow_adapter(directory)
    multiple = size_multiple(pipeline, family.name, getattr(pipe, family.denoiser))
    side = getattr(pipe, "default_sample_size", 128) * pipe.vae_scale_factor      # the stock pipelines' default
    side = max(multiple, side // multiple * multiple)
    steps = int(pipe.piflow_student.sampling.get("nfe", pipe.piflow_student.settings.nfe))
    negative = "negative_prompt" in inspect.signature(type(pipe).__call__).parameters and \
        "negative_prompt" not in family.pipeline.unused          # accepted and unused: no box for it
    return LoadedPipeline(pipe, family, pipeline, str(directory), multiple, (side, side), min(steps, MAX_NFE),
                          negative)


@dataclass(frozen=True)
class Request:
    """A checked text-to-image request (see `check_request`)."""

    prompt: str
    negative_prompt: Optional[str]
    seed: int
    height: int
    width: int
    steps: int
    temperature: Union[float, str]
    references: tuple[str, ...] = ()


def check_request(loaded: LoadedPipeline, prompt: str, seed: Any, height: Any, width: Any, steps: Any,
                  temperature: Any = "auto", negative_prompt: Optional[str] = None,
                  references: Optional[Sequence[str]] = None) -> Request:
    """The request, or a ValueError naming the first bad field and what it expects."""
    if not (prompt or "").strip():
        raise ValueError("prompt: write a prompt")
    seed = whole_number(seed, "seed", 0, MAX_SEED)
    m = loaded.multiple
    height = whole_number(height, "height", m, MAX_SIDE)
    width = whole_number(width, "width", m, MAX_SIDE)
    for name, value in (("height", height), ("width", width)):
        if value % m:
            raise ValueError(f"{name} must be a multiple of {m} (the model's patch size in pixels), got {value}")
    steps = whole_number(steps, "steps", 1, MAX_NFE)
    references = tuple(str(r) for r in (references or ()))
    if references and not loaded.takes_references:
        raise ValueError(f"reference images: {loaded.family.name} is text-to-image only; remove them")
    if not references and loaded.family.references == "required":
        raise ValueError(f"reference images: {loaded.family.name} is an editing model; add the image(s) to edit")
    negative = (negative_prompt or "").strip() or None
    if negative is not None and not loaded.takes_negative_prompt:
        negative = None
    return Request(prompt.strip(), negative, seed, height, width, steps, parse_temperature(temperature), references)


@dataclass
class Result:
    image: Any                # PIL image
    settings: dict            # what reproduces it (the request, the pipeline, the adapter)
    seconds: float
    warnings: list[str]


def generate(loaded: LoadedPipeline, request: Request,
             on_step: Optional[Callable[[int, int], None]] = None) -> Result:
    """One image of `request`; `on_step(done, total)` after each student step."""
    import torch

    from piflow.integrations.diffusers.prompts import load_reference_images

    arguments: dict = dict(prompt=request.prompt, height=request.height, width=request.width,
                           num_inference_steps=request.steps, temperature=request.temperature,
                           generator=torch.Generator().manual_seed(request.seed))
    if request.negative_prompt is not None:
        arguments["negative_prompt"] = request.negative_prompt
    if request.references:
        images = load_reference_images(list(request.references))
        arguments["image"] = images if len(images) > 1 else images[0]
    if on_step is not None:
        def callback(pipe, i, timestep, outputs):
            on_step(i + 1, request.steps)
            return outputs

        arguments["callback_on_step_end"] = callback
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = loaded.pipe(**arguments).images[0]
    seconds = time.perf_counter() - start
    settings = dict(asdict(request), references=list(request.references), pipeline=loaded.pipeline,
                    adapter=loaded.adapter, pipeline_class=type(loaded.pipe).__name__)
    messages = sorted({str(w.message).splitlines()[0] for w in caught if issubclass(w.category, UserWarning)})
    return Result(image, settings, seconds, messages)


def reproduce_command(settings: dict) -> str:
    """Python that reproduces the image of `generate`'s `settings` (pipeline, adapter, call arguments): a whole
    script, imports included, that runs as written."""
    arguments = {"prompt": settings["prompt"], "height": settings["height"], "width": settings["width"],
                 "num_inference_steps": settings["steps"], "temperature": settings["temperature"]}
    if settings.get("negative_prompt"):
        arguments["negative_prompt"] = settings["negative_prompt"]
    text = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    imports = f"import torch\nfrom piflow.integrations.diffusers import {settings['pipeline_class']}\n"
    if settings.get("references"):
        text += f", image=load_reference_images({settings['references']!r})"
        imports += "from piflow.integrations.diffusers.prompts import load_reference_images\n"
    return (imports + "\n"
            f"pipe = {settings['pipeline_class']}.from_pretrained({settings['pipeline']!r})\n"
            f"pipe.load_piflow_adapter({settings['adapter']!r})\n"
            f"image = pipe({text}, generator=torch.Generator().manual_seed({settings['seed']})).images[0]")
