"""diffusers integration (optional extra ``piflow[diffusers]``), imported lazily::

    from piflow.integrations.diffusers import PiFluxPipeline, load_piflow_adapter

Importing this package loads nothing heavy; the names in `__all__` and the submodules below import their submodule
(and diffusers) on first use.

* `families`: the registry ``FAMILIES`` (name → `Family`) and ``ARCHITECTURES``, one file per base-model family
  (FLUX.1, FLUX.2, Qwen-Image, Qwen-Image-Edit, SD3, Z-Image, Wan) holding everything that differs for it;
  `register_family`, `register_architecture`.
* `students`: GM/DX LoRA students and teachers on those transformers (`DiffusersPolicyStudent`,
  `DiffusersTeacher`, the aliases ``<Family>Teacher`` / ``<Family>PolicyStudent``); `set_lora_strength`.
* `pipelines`: one π-Flow pipeline per family (``Pi…Pipeline``, e.g. `PiFluxPipeline`, `PiWanPipeline`;
  `pipeline_class(family)`), and `PiFlowPipelineMixin.policy_denoise` for pipelines of your own.
* `adapter`: `save_piflow_adapter` / `load_piflow_adapter` (strict; piflow's layout and the authors',
  `authors_layout`) / `unload_piflow_adapter`.
* `loading`: safe loading of a base pipeline (diffusers/transformers components, safetensors weights) and its
  latent geometry.
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
    "Family": "families", "register_family": "families", "get_family": "families", "FAMILIES": "families",
    "Architecture": "families", "register_architecture": "families",
    "PiFlowPipelineMixin": "pipelines", "pipeline_class": "pipelines",
    "FlowMapSDEScheduler": "scheduler",
    "load_piflow_adapter": "adapter", "save_piflow_adapter": "adapter", "unload_piflow_adapter": "adapter",
    "DiffusersPolicyStudent": "students", "DiffusersTeacher": "students", "add_student_lora": "students",
    "set_lora_strength": "students",
    "quantization_config": "quantization", "load_quantized_transformer": "quantization",
}
_SUBMODULES = ("adapter", "authors_layout", "compat", "families", "loading", "pipelines", "prompts", "quantization",
               "scheduler", "solvers", "students", "tiny")


def _registry_names() -> dict[str, str]:
    """Names the family registry defines: each family's ``Pi…Pipeline`` and each architecture's aliases."""
    from piflow.integrations.diffusers.families import ARCHITECTURES, FAMILIES

    names = {family.pi_pipeline: "pipelines" for family in FAMILIES.values()}
    names.update({f"{a.alias}{kind}": "students" for a in ARCHITECTURES.values() if a.alias
                  for kind in ("Teacher", "PolicyStudent")})
    return names


__all__ = sorted({**_EXPORTS, **_registry_names()})


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")       # also sets the attribute on this package
    module = _EXPORTS.get(name) or _registry_names().get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value                      # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
