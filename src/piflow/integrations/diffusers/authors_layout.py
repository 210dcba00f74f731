"""The authors' adapter layout (Lakonik/piFlow: ``tools/export_piflow_to_diffusers.py`` writes it, the pipelines'
``load_piflow_adapter`` and the ComfyUI-piFlow nodes read it), both directions.

A folder holds ``config.json`` and ``diffusion_pytorch_model.safetensors``:
* GM: ``_class_name`` ``GMFluxTransformer2DModel`` / ``GMQwenImageTransformer2DModel`` /
  ``GMFlux2Transformer2DModel`` (FLUX.2 [dev] and [klein]; 128 packed channels) and every field of that
  class's constructor — ``num_gaussians``, ``constant_logstd`` (null), ``logstd_inner_dim``,
  ``gm_num_logstd_layers`` (2), ``logweights_channels`` (4, one per pixel of a 2×2 token), ``in_channels``,
  ``out_channels`` (the packed channels, 64) and the base transformer's own fields (``num_layers``, …) — because
  their loader builds the model with ``from_config(config.json)`` before it assigns the base weights. Tensors
  ``proj_out_means.*``, ``proj_out_logweights.*``, ``proj_out_logstds.{1,3}.*``, ``norm_out.linear.*`` and bare PEFT
  LoRA keys (``transformer_blocks.0.ff.net.2.lora_A.weight``; the loader routes every key containing "lora" to
  ``load_lora_adapter``, which takes lora_alpha = rank).
* DX: the base transformer itself with ``patch_size`` 1 and ``out_channels`` N·64 (N x0 nodes per token, node-major);
  tensors ``proj_out.*``, ``norm_out.linear.*`` and LoRA. Their exporter writes ``_class_name``
  ``DXFluxTransformer2DModel`` / ``DXQwenImageTransformer2DModel``, which their loader cannot resolve (it knows
  the two GM classes and diffusers' own); the adapters they publish carry the base class name
  (``FluxTransformer2DModel``), so that is what piflow writes, and it reads all three.
* Tensors are float16; ``config.json`` is ``json.dumps(…, indent=2, sort_keys=True)`` as diffusers writes it; the
  safetensors metadata ``policy_config`` is the policy's keyword arguments plus ``"type"`` ("GMFlow" | "DX") last.
  piflow adds one metadata entry, ``piflow_config`` (its π-ID settings and sampling schedule), which their code
  never reads; without it (the authors' own folders) the text-to-image defaults apply (4 NFE, shift 3.2, f 0.5).

What only piflow's own layout carries: the LoRA's alpha/dropout/target patterns (here alpha is folded into B so
that their alpha = rank convention gives the same update), float32 tensors, SD3 and registered architectures.
"""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from piflow.errors import DataError
from piflow.integrations.diffusers.families import ARCHITECTURES
from piflow.integrations.diffusers.families.base import PATCH, AuthorsClasses
from piflow.integrations.diffusers.students import POLICY_SETTINGS, DiffusersPolicyStudent

POLICY_TYPE = {"gmflow": "GMFlow", "dx": "DX"}
POLICY_DEFAULTS = {"mode": "grid"}                            # left out when they hold the authors' default
TENSOR_PREFIXES = {"proj_out_means.": "head.proj_means.", "proj_out_logweights.": "head.proj_logweights.",
                   "proj_out_logstds.": "head.logstd_mlp.", "proj_out.": "head.proj.", "norm_out.": "norm_out."}
OUR_PREFIXES = {ours: theirs for theirs, ours in TENSOR_PREFIXES.items()}
KIND_PREFIXES = {"gmflow": ("proj_out_means.", "proj_out_logweights.", "proj_out_logstds.", "norm_out."),
                 "dx": ("proj_out.", "norm_out.")}
METADATA_KEY = "piflow_config"
IN_CONFIG, IN_WEIGHTS = "config.json: ", "weights: "    # message prefixes the loader replaces by the file's path


def authors_classes() -> dict[str, AuthorsClasses]:
    """Architecture name → the authors' classes, for the architectures they publish adapters of (each family
    file's ``Architecture(authors=…)``)."""
    return {name: arch.authors for name, arch in ARCHITECTURES.items() if arch.authors is not None}


def _classes_for(architecture: str) -> AuthorsClasses:
    known = authors_classes()
    if architecture not in known:
        raise ValueError(f"the authors' adapter layout exists for {sorted(known)} students, not "
                         f"{architecture!r}; save it with layout='piflow'")
    return known[architecture]


def _json_value(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _base_config(transformer: torch.nn.Module) -> dict:
    """The base transformer's constructor fields (no private keys, no quantization_config: adapters are float)."""
    return {k: _json_value(v) for k, v in dict(transformer.config).items()
            if not k.startswith("_") and k != "quantization_config"}


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


def _authors_fields(kind: str, classes: AuthorsClasses, transformer: torch.nn.Module, structure: dict) -> dict:
    """The constructor fields of their model class for a student of this `structure` (GM: num_components,
    logstd_hidden; DX: num_nodes) on `transformer`: what piflow writes and what it checks when reading."""
    base = _base_config(transformer)
    packed = int(transformer.proj_out.out_features)                     # C·4 channels of a 2×2 token
    if kind == "gmflow":
        return {"num_gaussians": structure["num_components"], "constant_logstd": None,
                "logstd_inner_dim": structure["logstd_hidden"], "gm_num_logstd_layers": 2,
                "logweights_channels": PATCH ** 2, "in_channels": base.get("in_channels"), "out_channels": packed,
                **{k: base.get(k) for k in classes.gm_base_fields}}
    return dict(base, patch_size=1, out_channels=structure["num_nodes"] * packed)


def authors_config(student: DiffusersPolicyStudent) -> dict:
    """config.json of the student in the authors' layout (the fields their loader's ``from_config`` reads)."""
    classes = _classes_for(student.architecture.name)
    if student.policy_kind == "dx" and not classes.dx:
        raise ValueError(f"the authors' layout has no DX class for {student.architecture.name!r} students (they "
                         "publish GM ones only); save it with layout='piflow'")
    head = student.head
    if student.policy_kind == "gmflow":
        structure = {"num_components": head.num_components, "logstd_hidden": head.logstd_mlp[1].out_features}
    else:
        structure = {"num_nodes": head.num_nodes}
    config = _authors_fields(student.policy_kind, classes, student.transformer, structure)
    config["_class_name"] = classes.gm if student.policy_kind == "gmflow" else classes.base
    config["_diffusers_version"] = _diffusers_version()
    return config


def authors_policy_config(student: DiffusersPolicyStudent) -> dict:
    """The safetensors ``policy_config``: the policy's keyword arguments, then ``type``."""
    kind = student.policy_kind
    config = {k: v for k, v in student.resolved_policy_kwargs().items()
              if k in POLICY_SETTINGS[kind] and POLICY_DEFAULTS.get(k, object()) != v}
    config["type"] = POLICY_TYPE[kind]
    return config


def to_authors_tensors(tensors: dict[str, torch.Tensor], lora_scale: float) -> dict[str, torch.Tensor]:
    """piflow tensor names → the authors' (fp16); LoRA B is multiplied by `lora_scale` (alpha / rank)."""
    renamed = {}
    for key, value in tensors.items():
        if key.startswith("lora."):
            key = key[len("lora."):]
            if ".lora_B." in key and lora_scale != 1:
                value = value * lora_scale
        else:
            ours = next((p for p in OUR_PREFIXES if key.startswith(p)), None)
            if ours is None:
                raise ValueError(f"tensor {key!r} has no name in the authors' layout")
            key = OUR_PREFIXES[ours] + key[len(ours):]
        renamed[key] = value.detach().to(torch.float16).contiguous().cpu()
    return renamed


def authors_name(key: str) -> str:
    """The authors' name of a (renamed) piflow tensor name, for messages."""
    if key.startswith("lora."):
        return key[len("lora."):]
    ours = next((p for p in OUR_PREFIXES if key.startswith(p)), None)
    return OUR_PREFIXES[ours] + key[len(ours):] if ours else key


def is_authors_layout(tensors: dict) -> bool:
    return not any(key.startswith(("head.", "lora.")) for key in tensors)


def default_policy_config(config: dict, tensors: dict):
    """What ComfyUI-piFlow assumes when the metadata has no policy_config: GMFlow for the GM classes (a DX policy
    needs its settings, so DX gets no default)."""
    gm_classes = {classes.gm for classes in authors_classes().values()}
    if is_authors_layout(tensors) and config.get("_class_name") in gm_classes:
        return {"type": "GMFlow"}
    return None


def _class_kind(class_name: Any) -> tuple[str, str]:
    """(architecture, policy kind) named by an authors'-layout ``_class_name``."""
    known = authors_classes()
    for architecture, classes in known.items():
        if class_name == classes.gm:
            return architecture, "gmflow"
        if classes.dx and class_name in (classes.dx, classes.base):
            return architecture, "dx"
    names = sorted(n for c in known.values() for n in (c.gm, c.dx, c.base) if n)
    raise DataError(f"{IN_CONFIG}_class_name must be one of {names} (or a piflow adapter's), got "
                    f"{class_name!r}")


def _expect(field: str, value: Any, expected: Any) -> None:
    if value != expected:
        raise DataError(f"{IN_CONFIG}{field} is {value!r}, expected {expected!r} for this base model "
                        "and the adapter's tensors")


def _check_fields(config: dict, kind: str, classes: AuthorsClasses, transformer: torch.nn.Module,
                  structure: dict) -> None:
    """Every field the authors' loader reads that is present must agree with the base model and the tensors."""
    present = dict(config)
    if kind == "gmflow" and present.get("out_channels", 0) is None:    # their class: out_channels or in_channels
        present["out_channels"] = present.get("in_channels")
    for field, value in _authors_fields(kind, classes, transformer, structure).items():
        if field in present:
            _expect(field, _json_value(present[field]), value)


def _structure(kind: str, tensors: dict, transformer: torch.nn.Module, class_name: str) -> dict:
    """The policy structure read from the (already renamed) head tensors."""
    pixels = PATCH ** 2                    # 2×2-packed tokens (FLUX, Qwen-Image)
    try:
        if kind == "gmflow":
            num_components = int(tensors["head.proj_logweights.weight"].shape[0]) // pixels
            linears = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("head.logstd_mlp.")})
            if linears != [1, 3]:
                raise DataError(f"{IN_WEIGHTS}gm_num_logstd_layers must be 2 (tensors proj_out_logstds.1/.3), this "
                                f"{class_name} adapter has proj_out_logstds layers {linears}")
            return {"num_components": num_components,
                    "latent_channels": int(tensors["head.proj_means.weight"].shape[0]) // num_components // pixels,
                    "logstd_hidden": int(tensors["head.logstd_mlp.1.weight"].shape[0])}
        out_dim = int(transformer.proj_out.out_features)
        return {"num_nodes": int(tensors["head.proj.weight"].shape[0]) // out_dim, "latent_channels": out_dim // pixels,
                "mode": "grid"}
    except KeyError as error:
        raise DataError(f"{IN_WEIGHTS}missing tensors (first: {authors_name(error.args[0])!r}), needed by a "
                        f"{class_name} adapter") from None


def from_authors_layout(config: dict, tensors: dict, transformer: torch.nn.Module,
                        metadata: dict) -> tuple[dict, dict]:
    """Rename the authors' tensors to piflow's and build piflow's adapter config (policy structure from the tensor
    shapes, fields checked against the base model; a bad field raises a `DataError` naming it and its expected
    value, starting with `IN_CONFIG` or `IN_WEIGHTS`). Tensors of no known name (or LoRA tensors of modules this
    transformer lacks) are passed through unrenamed: the loader's strict check refuses them by name."""
    if "_class_name" not in config:
        raise DataError(f"{IN_CONFIG}no _class_name (expected e.g. 'GMFluxTransformer2DModel')")
    class_name = config["_class_name"]
    architecture, kind = _class_kind(class_name)
    classes = _classes_for(architecture)
    if type(transformer).__name__ != classes.base:
        raise DataError(f"{IN_CONFIG}a {class_name} adapter is for a {classes.base}, got a "
                        f"{type(transformer).__name__}")
    renamed, lora_modules, rank = {}, set(), None
    modules = dict(transformer.named_modules())
    for key, value in tensors.items():
        key = key.removeprefix("transformer.")                  # their loader strips this prefix too
        module, _, part = key.partition(".lora_A.") if ".lora_A." in key else key.partition(".lora_B.")
        prefix = next((p for p in KIND_PREFIXES[kind] if key.startswith(p)), None)
        if part and module in modules:                          # as their loader splits the file (LoRA A/B)
            renamed[f"lora.{key}"] = value
            lora_modules.add(module)                            # a module with A or B: both are expected
            if value.dim() == 2:
                rank = int(value.shape[0 if ".lora_A." in key else 1])
        elif prefix is not None:
            renamed[TENSOR_PREFIXES[prefix] + key[len(prefix):]] = value
        else:
            renamed[key] = value                                # unknown: the loader's strict check names it
    structure = _structure(kind, renamed, transformer, class_name)
    _check_fields(config, kind, classes, transformer, structure)
    policy = dict(config["policy_config"])
    if policy.get("type") != POLICY_TYPE[kind]:
        raise DataError(f"{IN_WEIGHTS}policy_config.type is {policy.get('type')!r}, expected {POLICY_TYPE[kind]!r} "
                        f"for a {class_name}")
    policy = {**structure, **policy}        # a saved DX mode overrides the default; the loader checks the keys
    result = {"architecture": architecture, "base_class": classes.base, "policy_config": policy,
              **_piflow_extras(metadata)}
    if lora_modules:
        result["lora_config"] = {"rank": rank, "alpha": float(rank), "dropout": 0.0,
                                 "target_modules": sorted(lora_modules)}
    return result, renamed


def _piflow_extras(metadata: dict) -> dict:
    """``piid_settings`` / ``sampling`` that piflow stored in the metadata (absent in the authors' own files)."""
    if METADATA_KEY not in metadata:
        return {}
    try:
        extras = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as error:
        raise DataError(f"{IN_WEIGHTS}metadata {METADATA_KEY} is not valid JSON ({error})") from None
    if not isinstance(extras, dict) or set(extras) - {"piid_settings", "sampling"}:
        raise DataError(f"{IN_WEIGHTS}metadata {METADATA_KEY} must be an object with piid_settings and sampling")
    return extras


def lora_alpha_scale(alpha: float, rank: int) -> float:
    """The factor folded into LoRA B so that lora_alpha = rank (their loader's convention) gives the same update."""
    scale = float(alpha) / float(rank)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA alpha / rank must be finite, got {alpha} / {rank}")
    return scale
