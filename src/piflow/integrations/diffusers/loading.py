"""Loading the base diffusers pipeline of a text-to-image run safely: components only from diffusers/transformers,
weights only from safetensors, the architecture and latent geometry read from the pipeline's config files."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from piflow.config import ConfigError
from piflow.errors import require
from piflow.files import one_line

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_device() -> torch.device:
    from piflow.train import distributed

    if torch.cuda.is_available():
        return torch.device("cuda", distributed.current().local_rank)
    return torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


SAFE_LIBRARIES = ("diffusers", "transformers")


def _model_index(path: str) -> dict:
    """A pipeline's model_index.json, checked so that loading it cannot import code from the pipeline folder: every
    component must come from diffusers or transformers (diffusers would otherwise import a module that ships with
    the pipeline)."""
    DiffusionPipeline = require("diffusers", "text-to-image pipelines").DiffusionPipeline
    if Path(path).is_absolute() and not Path(path).exists():        # a saved run's local folder, since moved
        raise ConfigError(f"pipeline folder {path} does not exist (moved or deleted?); point to its new place with "
                          "pipeline=NEW_PATH (an override of `piflow sample`; resuming `piflow distill` with it also "
                          "needs --allow-config-change)")
    try:
        index = DiffusionPipeline.load_config(path)
    except Exception as error:      # not a folder/repo with model_index.json, bad JSON, offline hub
        raise ConfigError(f"pipeline={path!r} is not a diffusers pipeline folder or reachable Hub repo "
                          f"({type(error).__name__}: {one_line(error, 200)})") from None
    for name, value in index.items():
        if not (isinstance(value, (list, tuple)) and len(value) == 2) or value[0] is None:
            continue
        if value[0] not in SAFE_LIBRARIES:
            raise ConfigError(f"pipeline {path}: component {name!r} comes from {value[0]!r}; piflow loads only "
                              f"components of {list(SAFE_LIBRARIES)} (custom code in a pipeline folder would run)")
        if str(value[1]).endswith("Pipeline") or (Path(path) / str(name) / "model_index.json").is_file():
            raise ConfigError(f"pipeline {path}: component {name!r} is itself a pipeline; piflow does not load "
                              f"nested pipelines (their weights would escape these checks)")
    return index


def pipeline_family(path: str):
    """The `Family` of a diffusers pipeline folder, from its model_index.json (nothing is loaded)."""
    from piflow.integrations.diffusers.families import family_of_pipeline

    index = _model_index(path)
    transformer = index.get("transformer") or index.get("unet")          # the denoiser: a transformer or a UNet
    transformer_class = transformer[1] if isinstance(transformer, (list, tuple)) and len(transformer) == 2 else None
    try:
        return family_of_pipeline(str(index.get("_class_name")), transformer_class)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None


def pipeline_architecture(path: str) -> str:
    """The family name ("flux", "sd3", "qwen", …) of a diffusers pipeline folder (nothing is loaded)."""
    return pipeline_family(path).name


def vae_scale_factor(vae_config: dict) -> int:
    """Spatial down-sampling of a diffusers VAE from its config (Wan/Qwen-style or AutoencoderKL-style)."""
    if vae_config.get("scale_factor_spatial"):            # AutoencoderKLWan states it
        return int(vae_config["scale_factor_spatial"])
    if "temperal_downsample" in vae_config:
        return 2 ** len(vae_config["temperal_downsample"])
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def _spatial_patch(config) -> int:
    """The spatial patch size of a transformer that patchifies itself (SD3 2, Z-Image ``all_patch_size``, Wan
    (1, 2, 2))."""
    patch = config.get("patch_size") or (config.get("all_patch_size") or [1])[0]
    return int(patch[-1] if isinstance(patch, (list, tuple)) else patch)


def _vae_config(path: str) -> dict:
    import diffusers

    vae_class = _model_index(path).get("vae", [None, "AutoencoderKL"])[1]
    return getattr(diffusers, vae_class).load_config(path, subfolder="vae")


def scheduler_config(path: str, family: str) -> Optional[dict]:
    """The scheduler config of a diffusion family's pipeline folder (its schedule and prediction type convert the
    network, `families.base.Parametrisation`); None for flow-matching families."""
    import diffusers

    from piflow.integrations.diffusers.families import get_architecture, get_family

    if get_architecture(get_family(family).architecture).parametrisation is None:
        return None
    entry = _model_index(path).get("scheduler")
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and hasattr(diffusers, str(entry[1]))):
        raise ConfigError(f"pipeline {path}: no diffusers scheduler in model_index.json (a {family} teacher needs "
                          "its scheduler config: the training schedule and prediction_type)")
    try:
        return dict(getattr(diffusers, entry[1]).load_config(path, subfolder="scheduler"))
    except Exception as error:      # missing or unreadable scheduler_config.json
        raise ConfigError(f"pipeline {path}: cannot read the scheduler config ({type(error).__name__}: "
                          f"{one_line(error, 200)})") from None


def size_multiple(path: str, family: str, transformer) -> int:
    """The pixel multiple that image heights and widths must be for this pipeline: the VAE's down-sampling times
    the patch size (2 for the 2×2-packed families)."""
    from piflow.integrations.diffusers.families import get_family

    outside = get_family(family).latent_packing == "outside"
    return vae_scale_factor(_vae_config(path)) * (2 if outside else _spatial_patch(transformer.config))


def latent_geometry(path: str, family: str, transformer, resolution, num_frames: int = 1) -> tuple[int, ...]:
    """(channels, height, width) — (channels, frames, height, width) for video — of the latents the transformer
    sees for a `resolution` image (or `num_frames`-frame video)."""
    from piflow.integrations.diffusers.families import get_family

    spec = get_family(family)
    vae_config = _vae_config(path)
    factor = vae_scale_factor(vae_config)
    height, width = (int(v) for v in resolution)
    outside = spec.latent_packing == "outside"
    multiple = size_multiple(path, family, transformer)
    if height % multiple or width % multiple:
        raise ConfigError(f"resolution {height}×{width} must be divisible by {multiple} for this pipeline")
    channels = transformer.config.in_channels // (4 if outside else 1)
    if not spec.video:
        return channels, height // factor, width // factor
    temporal = int(vae_config.get("scale_factor_temporal") or
                   2 ** sum(bool(v) for v in vae_config.get("temperal_downsample", ())))
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise ConfigError(f"num_frames must be 1 + a multiple of {temporal} for this pipeline, got {num_frames}")
    return channels, (num_frames - 1) // temporal + 1, height // factor, width // factor


def from_pretrained(cls, path: str, **kwargs):
    """``cls.from_pretrained(path, use_safetensors=True, ...)``: weights are read from safetensors only (never from
    pickled ``.bin`` files); a pipeline without them is a one-line `ConfigError`."""
    index = _model_index(path)
    if "Qwen2VLProcessor" in str(index.get("processor", "")):      # Qwen-Image-Edit without torchvision
        from piflow.integrations.diffusers.compat import allow_processor_without_video

        allow_processor_without_video()
    try:
        return cls.from_pretrained(path, use_safetensors=True, **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(f"cannot load {cls.__name__} from {path} with safetensors weights (piflow never loads "
                          f"pickled .bin weights): {one_line(error, 300)}") from None


def base_dtype(config: dict, device: torch.device) -> torch.dtype:
    """The compute dtype of a run's base: ``config["dtype"]`` on `device`, but bf16 for a quantized base asked to
    run in fp32 (integer weight-only kernels compute in bf16)."""
    dtype = resolve_dtype(config["dtype"], device)
    return torch.bfloat16 if config.get("quantize") and dtype == torch.float32 else dtype


def load_base(config: dict, device: torch.device, dtype: torch.dtype, transformer_only: bool = False,
              pipeline_class=None):
    """(pipeline or None, frozen transformer): only the transformer when prompts come from a cache (or
    `transformer_only`), else the whole pipeline, whose text encoders encode the prompts here. A `pipeline_class`
    (sampling) always loads the whole pipeline, of that class. ``config["quantize"]`` (a backend of
    `piflow.integrations.diffusers.quantization`) loads the transformer quantized; the pipeline then shares it."""
    import diffusers

    path = config["pipeline"]
    denoiser = pipeline_family(path).denoiser          # "transformer", or "unet" (SD 1.5, SDXL)
    transformer_class = getattr(diffusers, _model_index(path)[denoiser][1])
    transformer = None
    if config.get("quantize") and denoiser != "transformer":
        raise ConfigError(f"quantize={config['quantize']}: quantized bases are supported for transformers only, not "
                          f"for the {denoiser} of {path}")
    if config.get("quantize"):
        from piflow.integrations.diffusers.quantization import (BACKENDS, CUDA_ONLY_BACKENDS,
                                                                load_quantized_transformer)

        if config["quantize"] not in BACKENDS:
            raise ConfigError(f"quantize must be null or one of {list(BACKENDS)}, got {config['quantize']!r}")
        try:
            transformer = load_quantized_transformer(path, config["quantize"], dtype=dtype,
                                                     transformer_class=transformer_class.__name__)
        except (ImportError, RuntimeError, ValueError, OSError) as error:   # e.g. bitsandbytes without a GPU
            raise ConfigError(f"quantize={config['quantize']}: cannot load the base transformer quantized "
                              f"({type(error).__name__}: {one_line(error, 300)})") from None
        if config["quantize"] not in CUDA_ONLY_BACKENDS:     # bitsandbytes places its weights itself
            transformer = transformer.to(device)
    if transformer_only or (config["prompt_cache"] is not None and pipeline_class is None):
        if transformer is None:
            transformer = from_pretrained(transformer_class, path, subfolder=denoiser, torch_dtype=dtype)
            transformer = transformer.to(device)
        return None, transformer.requires_grad_(False)
    extra = {} if transformer is None else {denoiser: transformer}
    # components saved as absent ([null, null] in model_index.json: LongCat's tiny text_processor) are passed as
    # None, which diffusers accepts where it would otherwise refuse a pipeline whose __init__ requires them
    extra.update({name: None for name, entry in _model_index(path).items()
                  if isinstance(entry, list) and entry and entry[0] is None})
    pipe = from_pretrained(pipeline_class or diffusers.DiffusionPipeline, path, torch_dtype=dtype, **extra)
    for component in pipe.components.values():      # a quantized transformer was placed above
        if isinstance(component, torch.nn.Module) and component is not transformer:
            component.to(device)
    return pipe, getattr(pipe, denoiser).requires_grad_(False)
