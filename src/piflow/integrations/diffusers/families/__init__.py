"""The registry of the base-model families piflow distils: ``FAMILIES`` (name → `Family`) and ``ARCHITECTURES``
(name → student `Architecture`), read by the CLI, recipes, adapters, pipelines, prompt encoding, the tiny test
pipelines and the tests — the one table of what each family is.

Each module of this package but `base` and `calls` is one family file (``flux``, ``flux2``, ``qwen``, ``qwen_edit``,
``sd3``, ``wan``, ``zimage``, ``pixart``, and the UNet families ``sd15``, ``sdxl``) holding everything that differs for it: the student `Architecture` (model inputs,
token layout, LoRA targets, final-layer hooks, the authors' class names), prompt encoding and collation, the
π-Flow pipeline's `PipelineHooks` and the tiny builder for tests; it ends with ``FAMILIES = (Family(...), ...)``.
Adding a family is adding such a file (and its test cases in ``tests/integrations/family_cases.py``): it is found
here by name, its pipeline class ``Pi…Pipeline`` is built by `pipelines` and exported by the package.

A family is named by its stock diffusers pipeline (``model_index.json``'s ``_class_name``): FLUX.2 [dev] and
FLUX.2 [klein] share one transformer class but not their text encoders or guidance; Qwen-Image and Qwen-Image-Edit
share one transformer but Edit also conditions on reference images. Importing this package loads neither diffusers
nor the models.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Optional, Union

from piflow.integrations.diffusers.families.base import (NULL_PREFIX, REFERENCE_PREFIX, TEXT_TO_IMAGE_SCHEDULE,
                                                         Architecture, Family, Parametrisation, reference_latents)

FAMILIES: dict[str, Family] = {}
ARCHITECTURES: dict[str, Architecture] = {}
SHARED_MODULES = ("base", "calls")


def register_architecture(architecture: Architecture) -> Architecture:
    """Make `architecture` known by name (students, teachers and `load_piflow_adapter` look it up)."""
    if architecture.layout not in ("cp", "pc"):
        raise ValueError(f"layout must be 'cp' or 'pc', got {architecture.layout!r}")
    if not architecture.base_class:
        raise ValueError("an Architecture needs base_class (the transformer class name) to be registered")
    ARCHITECTURES[architecture.name] = architecture
    return architecture


def get_architecture(name: Union[str, Architecture]) -> Architecture:
    """The registered `Architecture` called `name` (an `Architecture` is returned as is)."""
    if isinstance(name, Architecture):
        return name
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; expected one of {sorted(ARCHITECTURES)} "
                         "(register your own with register_architecture)")
    return ARCHITECTURES[name]


def register_family(family: Family) -> Family:
    """Make `family` known by name; its architecture must be registered."""
    if family.guidance not in ("embedded", "cfg", "none"):
        raise ValueError(f"guidance must be 'embedded', 'cfg' or 'none', got {family.guidance!r}")
    if family.references not in ("none", "optional", "required"):
        raise ValueError(f"references must be 'none', 'optional' or 'required', got {family.references!r}")
    if family.latent_packing not in ("outside", "inside"):
        raise ValueError(f"latent_packing must be 'outside' or 'inside', got {family.latent_packing!r}")
    get_architecture(family.architecture)
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def family_of_pipeline(pipeline_class: str, transformer_class: Optional[str] = None) -> Family:
    """The family of a stock (or π-Flow) pipeline class name; a pipeline piflow does not know, but whose
    transformer class is that of exactly one text-to-image family, maps to that family."""
    for family in FAMILIES.values():
        if pipeline_class in (family.stock_pipeline, family.pi_pipeline):
            return family
    matches = [f for f in FAMILIES.values() if f.transformer_class == transformer_class and f.references != "required"]
    if transformer_class is not None and len(matches) >= 1:
        return matches[0]
    known = sorted({f.stock_pipeline for f in FAMILIES.values()})
    raise ValueError(f"pipeline class {pipeline_class} (transformer {transformer_class}) is not supported; "
                     f"expected one of {known} (see the bring-your-own-teacher guide)")


def family_of_transformer(transformer_class: str) -> Family:
    """The text-to-image family of a transformer class (the first registered one)."""
    for family in FAMILIES.values():
        if family.transformer_class == transformer_class:
            return family
    known = sorted({f.transformer_class for f in FAMILIES.values()})
    raise ValueError(f"transformer class {transformer_class} is not supported; expected one of {known} "
                     "(see the bring-your-own-teacher guide)")


def _register_family_files() -> None:
    """Register the architecture and families of every family file of this package, in file-name order."""
    names = sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in SHARED_MODULES)
    for name in names:
        module = importlib.import_module(f"{__name__}.{name}")
        if hasattr(module, "ARCHITECTURE"):          # qwen_edit: Qwen-Image's architecture, from qwen
            register_architecture(module.ARCHITECTURE)
        for family in module.FAMILIES:
            register_family(family)


_register_family_files()

__all__ = ["ARCHITECTURES", "FAMILIES", "NULL_PREFIX", "REFERENCE_PREFIX", "TEXT_TO_IMAGE_SCHEDULE", "Architecture",
           "Family", "Parametrisation", "family_of_pipeline", "family_of_transformer", "get_architecture", "get_family",
           "reference_latents", "register_architecture", "register_family"]
