"""diffusers integration (optional extra ``piflow[diffusers]``), imported lazily::

    from piflow.integrations.diffusers import PiFluxPipeline, load_piflow_adapter

Importing this package loads nothing heavy; the names in `__all__` and the submodules below import their submodule
(and diffusers) on first use.

* `students`: GM/DX LoRA students and teachers on FLUX.1, FLUX.2, Qwen-Image, SD3, Z-Image and Wan transformers;
  `Architecture` / `register_architecture` to bring your own; `set_lora_strength`.
* `families`: the base-model families (pipelines, condition encoding and batching, guidance); `register_family`.
* `pipelines`: `PiFluxPipeline`, `PiFlux2Pipeline`, `PiFlux2KleinPipeline`, `PiQwenImagePipeline`,
  `PiQwenImageEditPipeline`, `PiQwenImageEditPlusPipeline`, `PiSD3Pipeline`, `PiZImagePipeline`, `PiWanPipeline`.
* `adapter`: `save_piflow_adapter` / `load_piflow_adapter` (piflow's layout and the authors', `authors_layout`).
* `quantization`: frozen bases quantized through diffusers' quantization configs (TorchAO, bitsandbytes, GGUF).
* `prompts`: prompt files, on-the-fly encoding, sharded prompt-embedding caches.
* `scheduler`: `FlowMapSDEScheduler` as a diffusers scheduler.
* `solvers`: diffusers' multistep solvers as teacher baselines.
* `tiny`: tiny random-weight pipelines built from scratch (tests, offline smoke runs).
* `compat`: work-arounds for library versions (Qwen2VLProcessor without torchvision).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "PiFluxPipeline": "pipelines", "PiQwenImagePipeline": "pipelines", "PiSD3Pipeline": "pipelines",
    "PiFlux2Pipeline": "pipelines", "PiFlux2KleinPipeline": "pipelines", "PiQwenImageEditPipeline": "pipelines",
    "PiQwenImageEditPlusPipeline": "pipelines", "PiZImagePipeline": "pipelines", "PiWanPipeline": "pipelines",
    "Family": "families", "register_family": "families", "get_family": "families",
    "FlowMapSDEScheduler": "scheduler",
    "load_piflow_adapter": "adapter", "save_piflow_adapter": "adapter",
    "DiffusersPolicyStudent": "students", "DiffusersTeacher": "students", "Architecture": "students",
    "register_architecture": "students", "add_student_lora": "students", "set_lora_strength": "students",
    "FluxPolicyStudent": "students", "QwenImagePolicyStudent": "students", "SD3PolicyStudent": "students",
    "FluxTeacher": "students", "QwenImageTeacher": "students", "SD3Teacher": "students",
    "quantization_config": "quantization", "load_quantized_transformer": "quantization",
}
_SUBMODULES = ("adapter", "authors_layout", "compat", "families", "pipelines", "prompts", "quantization", "scheduler",
               "solvers", "students", "tiny")
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")       # also sets the attribute on this package
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value                      # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | set(_SUBMODULES))
