"""Save and load π-Flow FLUX/SD3 students as adapter folders: the trainable tensors only, the base model stays shared.

Layout (piflow adapter format v1):
* ``config.json``: ``_class_name`` (e.g. ``GMFluxTransformer2DModel``, ``DXSD3Transformer2DModel``), ``base_class``,
  ``architecture``, ``policy_config`` and ``lora_config``;
* ``diffusion_pytorch_model.safetensors``: ``head.*`` (policy head), ``norm_out.*`` (the student's final norm) and
  ``lora.<module>.lora_A/B.weight`` (PEFT tensors with the adapter name stripped); its safetensors metadata repeats
  ``policy_config`` as JSON ({"type": "GMFlow"|"DX", …, plus the policy's own settings, e.g. DX ``segment_size`` and
  ``shift``, which must keep their training values at any NFE, algorithm.md §5.3});
* ``piid_settings`` in config.json: the student's `PiIDSettings` (all π-ID settings it was trained with);
* optional ``sampling`` in config.json: the training ``nfe``, ``shift``, ``final_step_size_scale`` and
  ``total_substeps`` that the pipelines sample with (defaults when absent: 4, 3.2, 0.5, 128 — the T2I settings of
  §4.7);
* ``scheduler_config`` in config.json, diffusion architectures only (PixArt-α): the schedule keys of the scheduler
  config the student was trained against (`families.base.SCHEDULE_KEYS`), which its conversion of network outputs
  to velocities uses (absent: the architecture's declared one).
The authors' layout (`piflow.integrations.diffusers.authors_layout`: what their exporter writes and their
pipelines and ComfyUI nodes read) is written with ``layout="authors"`` and read automatically. It is checked
against folders built here as their code builds them, not against a downloaded published adapter (nothing can be
downloaded on this machine).
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from piflow.integrations.diffusers import authors_layout
from piflow.integrations.diffusers.students import (LORA_ADAPTER, POLICY_SETTINGS, TEXT_TO_IMAGE_SCHEDULE,
                                                    DiffusersPolicyStudent, add_student_lora, get_architecture,
                                                    set_lora_strength)
from piflow.checks import check_number
from piflow.errors import DataError
from piflow.files import atomic_write, read_json, write_json
from piflow.settings import PiIDSettings

WEIGHTS = "diffusion_pytorch_model.safetensors"
POLICY_TYPES = {"GMFlow": "gmflow", "DX": "dx"}
STRUCTURE_KEYS = {"gmflow": ("num_components", "latent_channels", "logstd_hidden"),
                  "dx": ("num_nodes", "mode", "latent_channels")}
SAMPLING_DEFAULTS = PiIDSettings(**TEXT_TO_IMAGE_SCHEDULE).sampling      # with PiIDSettings' total_substeps
LAYOUTS = ("piflow", "authors")


def _policy_config(student: DiffusersPolicyStudent) -> dict:
    head = student.head
    if student.policy_kind == "gmflow":
        hidden = [m for m in head.logstd_mlp if isinstance(m, torch.nn.Linear)][0].out_features
        config = {"type": "GMFlow", "num_components": head.num_components, "latent_channels": head.channels,
                  "logstd_hidden": hidden}
    else:
        config = {"type": "DX", "num_nodes": head.num_nodes, "mode": head.mode,
                  "latent_channels": student.latent_channels}
    config.update(student.resolved_policy_kwargs())          # keys checked by the student (POLICY_SETTINGS)
    return config


def save_piflow_adapter(student: DiffusersPolicyStudent, directory: Union[str, Path],
                        adapter_name: str = LORA_ADAPTER, sampling: Optional[dict] = None,
                        layout: str = "piflow") -> Path:
    """Write the student's head, final norm and LoRA tensors (atomic writes) into `directory`.

    The student's policy settings (`resolved_policy_kwargs`, e.g. DX ``segment_size``/``shift``) go into
    ``policy_config``; `sampling` ({"nfe", "shift", "final_step_size_scale", "total_substeps"}, default: the
    student's training schedule, `student.sampling`) into config.json. ``layout="authors"`` writes the folder the
    authors' exporter writes (FLUX.1 and Qwen-Image; fp16, their names and config fields, see `authors_layout`),
    which their pipelines and ComfyUI-piFlow load; piflow reads both layouts."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    directory = Path(directory)
    tensors = {f"head.{k}": v for k, v in student.head.state_dict().items()}
    tensors.update({f"norm_out.{k}": v for k, v in student.norm_out.state_dict().items()})
    lora_config = None
    peft_config = getattr(student.transformer, "peft_config", {}).get(adapter_name)
    if peft_config is not None:
        from peft import get_peft_model_state_dict

        lora = get_peft_model_state_dict(student.transformer, adapter_name=adapter_name)
        tensors.update({f"lora.{k}": v for k, v in lora.items()})
        targets = peft_config.target_modules
        lora_config = {"rank": peft_config.r, "alpha": peft_config.lora_alpha, "dropout": peft_config.lora_dropout,
                       "target_modules": targets if isinstance(targets, str) else sorted(targets)}
        if peft_config.rank_pattern or peft_config.alpha_pattern:
            raise ValueError("adapters with per-module LoRA ranks or alphas (rank_pattern/alpha_pattern) are not "
                             "supported")
    sampling = _check_sampling(sampling if sampling is not None else student.sampling)
    if layout == "authors":
        return _save_authors_layout(student, directory, tensors, lora_config, sampling)
    policy_config = _policy_config(student)
    data = safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                             metadata={"policy_config": json.dumps(policy_config), "format": "piflow-adapter-v1"})
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS, data)
    base = student.architecture.base_class or type(student.transformer).__name__
    config = {"_class_name": ("GM" if policy_config["type"] == "GMFlow" else "DX") + base, "base_class": base,
              "architecture": student.architecture.name, "policy_config": policy_config, "lora_config": lora_config,
              "sampling": sampling, "piid_settings": student.settings.to_dict()}
    if getattr(student, "scheduler_config", None) is not None:     # diffusion teachers: the schedule converted
        config["scheduler_config"] = student.scheduler_config
    write_json(directory / "config.json", config)
    return directory


def _save_authors_layout(student: DiffusersPolicyStudent, directory: Path, tensors: dict,
                         lora_config: Optional[dict], sampling: dict) -> Path:
    config = authors_layout.authors_config(student)             # raises for architectures they have no class for
    if lora_config is None:
        raise ValueError("the authors' loader installs an adapter only when it holds LoRA tensors (without them it "
                         "keeps the base model, heads unused); this student has no LoRA, save it with "
                         "layout='piflow'")
    scale = authors_layout.lora_alpha_scale(lora_config["alpha"], lora_config["rank"]) if lora_config else 1.0
    extras = {"piid_settings": student.settings.to_dict(), "sampling": sampling}
    metadata = {"policy_config": json.dumps(authors_layout.authors_policy_config(student)),
                authors_layout.METADATA_KEY: json.dumps(extras)}
    data = safetensors_bytes(authors_layout.to_authors_tensors(tensors, scale), metadata=metadata)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS, data)
    write_json(directory / "config.json", config, sort_keys=True)       # diffusers' own config.json format
    return directory


def _check_lora_config(lora_config, directory: Path) -> dict:
    """config.json's lora_config with its types checked (a ValueError names the field)."""
    where = f"adapter file {directory / 'config.json'}: lora_config"
    if not isinstance(lora_config, dict):
        raise DataError(f"{where} must be a JSON object")
    for key in ("rank", "alpha", "dropout", "target_modules"):
        if key not in lora_config:
            raise DataError(f"{where} is missing {key!r}")
    rank, alpha, dropout, targets = (lora_config[k] for k in ("rank", "alpha", "dropout", "target_modules"))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise DataError(f"{where}.rank must be an integer >= 1, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise DataError(f"{where}.alpha must be a number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise DataError(f"{where}.dropout must be a number in [0, 1), got {dropout!r}")
    if not (isinstance(targets, str) or isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise DataError(f"{where}.target_modules must be a string or a list of strings, got {targets!r}")
    return lora_config


def _settings(config: dict, kind: str, sampling: dict) -> PiIDSettings:
    """The student's `PiIDSettings`: config.json's ``piid_settings`` (written since the settings object exists),
    with the ``sampling`` schedule (which a user may edit, and older adapters carry alone) taking precedence."""
    saved = config.get("piid_settings")
    if saved is not None and not isinstance(saved, dict):
        raise DataError(f"piid_settings must be a JSON object, got {saved!r}")
    try:
        return PiIDSettings.from_mapping(saved or {}, **dict(sampling, policy=kind))
    except (TypeError, ValueError) as error:
        raise DataError(f"bad piid_settings ({error})") from None


def _check_sampling(sampling: Optional[dict]) -> dict:
    if sampling is not None and not isinstance(sampling, dict):
        raise DataError(f"sampling must be a mapping of {sorted(SAMPLING_DEFAULTS)}, got {sampling!r}")
    merged = dict(SAMPLING_DEFAULTS, **(sampling or {}))
    unknown = sorted(set(merged) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise DataError(f"sampling has unknown keys {unknown}; expected {sorted(SAMPLING_DEFAULTS)}")
    try:                                     # the checks of the settings object itself
        schedule = PiIDSettings(**merged).sampling
    except (TypeError, ValueError) as error:
        raise DataError(f"sampling {merged}: {error}") from None
    return schedule


def _weights_file(directory: Path) -> Path:
    if (directory / WEIGHTS).is_file():
        return directory / WEIGHTS
    candidates = sorted(directory.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    raise FileNotFoundError(f"adapter file {directory / WEIGHTS} is missing" + (
        f" (and {len(candidates)} other .safetensors files make it ambiguous)" if candidates else ""))


def _read_adapter(directory: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str], Path]:
    """config.json, the tensors, the safetensors metadata (with ``policy_config``) and the weights file's path."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"adapter file {config_path} is missing")
    weights_path = _weights_file(directory)
    config = read_json(config_path, "adapter config")
    if not isinstance(config, dict):
        raise DataError(f"adapter config {config_path} must hold a JSON object")
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:
        raise DataError(f"adapter file {weights_path} is corrupt or truncated ({type(error).__name__}: {error})") \
            from error
    if "policy_config" not in metadata:
        default = authors_layout.default_policy_config(config, tensors)   # GM in the authors' layout
        if default is None:
            raise DataError(f"adapter file {weights_path} has no policy_config metadata")
        metadata = dict(metadata, policy_config=json.dumps(default))
    try:
        policy = json.loads(metadata["policy_config"])
    except json.JSONDecodeError as error:
        raise DataError(f"adapter file {weights_path}: its policy_config metadata is not valid JSON ({error})") \
            from None
    if not isinstance(policy, dict):
        raise DataError(f"adapter file {weights_path}: policy_config must be a JSON object")
    saved = config.get("policy_config")          # piflow's layout repeats it in config.json: both must agree
    if saved is not None and not authors_layout.is_authors_layout(tensors):
        _check_policy_config(policy, f"adapter file {weights_path}")       # the metadata's own checks first
        if not isinstance(saved, dict):
            raise DataError(f"adapter file {config_path}: policy_config must be a JSON object, got {saved!r}")
        differing = sorted(k for k in set(saved) | set(policy) if saved.get(k, _ABSENT) != policy.get(k, _ABSENT))
        if differing:
            key = differing[0]
            raise DataError(f"adapter file {config_path}: policy_config[{key!r}] is {saved.get(key, '<absent>')!r} "
                            f"but the policy_config metadata of {weights_path.name} says "
                            f"{policy.get(key, '<absent>')!r}")
    config["policy_config"] = policy
    return config, tensors, metadata, weights_path


_ABSENT = object()


def _check_piflow_class_name(config: dict, kind: str, base: str, config_path: Path) -> None:
    """config.json's ``_class_name`` in piflow's layout: absent or the class piflow writes (``GM``/``DX`` + base)."""
    expected = ("GM" if kind == "gmflow" else "DX") + base
    if "_class_name" in config and config["_class_name"] != expected:
        raise DataError(f"adapter file {config_path}: _class_name is {config['_class_name']!r}, expected "
                        f"{expected!r} (or no _class_name) for this {kind} adapter")


def _check_policy_config(policy: dict, where: str) -> str:
    """The policy kind of a ``policy_config``: its type known, its structure keys present, no unknown key."""
    kind = POLICY_TYPES.get(policy.get("type"))
    if kind is None:
        raise DataError(f"{where}: policy_config.type must be one of {sorted(POLICY_TYPES)}, got "
                        f"{policy.get('type')!r}")
    missing = [key for key in STRUCTURE_KEYS[kind] if key not in policy]
    if missing:
        raise DataError(f"{where}: policy_config is missing {missing} (needed for a {policy['type']} adapter)")
    unknown = sorted(set(policy) - {"type", *STRUCTURE_KEYS[kind], *POLICY_SETTINGS[kind]})
    if unknown:
        raise DataError(f"{where}: policy_config has unknown keys {unknown}; a {policy['type']} policy takes "
                        f"{['type', *STRUCTURE_KEYS[kind], *POLICY_SETTINGS[kind]]}")
    return kind


def _check_lora_rank(tensors: dict[str, torch.Tensor], rank: int, weights_path: Path, name) -> None:
    """Every LoRA A (rank, in) / B (out, rank) tensor has config.json's ``lora_config.rank``."""
    for key in sorted(tensors):
        axis = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
        if key.startswith("lora.") and axis is not None and tensors[key].dim() == 2 \
                and tensors[key].shape[axis] != rank:
            raise DataError(f"adapter file {weights_path}: tensor {name(key)!r} has LoRA rank "
                            f"{tensors[key].shape[axis]}, but config.json says lora_config.rank = {rank}")


def check_adapter_tensors(expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor], weights_path: Path,
                          name=str, strict: bool = True) -> None:
    """The strict check of an adapter's tensors against what the student owns (`expected`: name → shape): every
    tensor present with its shape and nothing unknown (`strict=False` lets missing and unknown ones pass with a
    warning; a wrong shape is always an error). A `DataError` names the file and the first offending key (as the
    file spells it: `name`)."""
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != tuple(expected[key]):
            raise DataError(f"adapter file {weights_path}: tensor {name(key)!r} has shape "
                            f"{list(tensors[key].shape)}, expected {list(expected[key])} from the adapter's config "
                            "and this transformer")
    missing, unknown = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    problems = [f"{len(missing)} missing tensors (first: {name(missing[0])!r})"] if missing else []
    problems += [f"{len(unknown)} unknown tensors (first: {name(unknown[0])!r})"] if unknown else []
    if not problems:
        return
    message = f"adapter file {weights_path}: " + " and ".join(problems)
    if strict:
        raise DataError(message + " — an incomplete or altered adapter (load_piflow_adapter(..., strict=False) "
                        "loads it anyway)")
    warnings.warn(message + " — loaded anyway (strict=False): missing tensors keep their initial values, unknown "
                  "ones are ignored", UserWarning, stacklevel=3)


def resolve_adapter_dir(path_or_repo: Union[str, Path], subfolder: Optional[str] = None) -> Path:
    """A local adapter folder, or a Hugging Face Hub repo id fetched (or found in the local cache) by
    ``huggingface_hub.snapshot_download``."""
    local = Path(path_or_repo)
    if local.is_dir():
        return local / subfolder if subfolder else local
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(path_or_repo)) or local.parent.is_dir() and str(local.parent) != ".":
        raise FileNotFoundError(f"adapter folder {local} does not exist (it should hold config.json and "
                                f"{WEIGHTS}); a Hub repo id looks like 'namespace/name'")
    try:
        from huggingface_hub import snapshot_download

        root = snapshot_download(str(path_or_repo), allow_patterns=[f"{subfolder}/*"] if subfolder else None)
    except Exception as error:
        raise FileNotFoundError(f"adapter {path_or_repo!r} is not a local folder and could not be fetched from the "
                                f"Hugging Face Hub ({type(error).__name__}: {error})") from error
    return Path(root) / subfolder if subfolder else Path(root)


def _student_tensors(student: DiffusersPolicyStudent) -> dict[str, torch.Size]:
    """Name → shape of the head and final-norm tensors the student owns (LoRA aside), as adapters name them."""
    shapes = {f"head.{k}": v.shape for k, v in student.head.state_dict().items()}
    shapes.update({f"norm_out.{k}": v.shape for k, v in student.norm_out.state_dict().items()})
    return shapes


def load_piflow_adapter(transformer: torch.nn.Module, path: Union[str, Path], subfolder: Optional[str] = None,
                        adapter_name: str = LORA_ADAPTER, strength: float = 1.0,
                        strict: bool = True) -> DiffusersPolicyStudent:
    """Attach a saved adapter (local folder or Hub repo id, optional `subfolder`; piflow's or the authors' layout)
    to a FLUX/SD3/Qwen-Image `transformer` (shared, not copied; it may be quantized) and return the student in eval
    mode (``.train()`` to fine-tune further).

    Loading is strict (both layouts, `check_adapter_tensors`): every tensor the student owns must be in the file
    with its shape, nothing unknown may be, and config.json / the metadata must agree with the tensors (LoRA
    rank, policy type and structure, ``_class_name``); otherwise a one-line `DataError` names the file and the first
    offending key. Every check but the LoRA key check runs before the transformer is touched; that one runs once
    the previous adapter of that name is replaced and then leaves none (never a half-loaded one). ``strict=False``
    loads an incomplete adapter (or one with extra tensors) with a warning. `unload_piflow_adapter` removes it.

    `strength` scales the LoRA update (the policy head and final norm stay as trained), like ComfyUI-piFlow's
    ``adapter_strength``: 1 reproduces training; lower values can help on a fine-tuned/merged base model, with
    other LoRAs stacked on top, or at an NFE other than the trained one (see docs/adapters.md)."""
    strength = check_number(strength, "strength")
    directory = resolve_adapter_dir(path, subfolder)
    config, tensors, metadata, weights_path = _read_adapter(directory)
    name = str
    if authors_layout.is_authors_layout(tensors):
        try:
            config, tensors = authors_layout.from_authors_layout(config, tensors, transformer, metadata)
        except DataError as error:          # the message starts with the file it is about
            message = str(error)
            for prefix, file in ((authors_layout.IN_CONFIG, directory / "config.json"),
                                 (authors_layout.IN_WEIGHTS, weights_path)):
                message = f"adapter file {file}: {message[len(prefix):]}" if message.startswith(prefix) else message
            raise DataError(message) from None
        name = authors_layout.authors_name
    policy = config["policy_config"]
    kind = _check_policy_config(policy, f"adapter file {weights_path}")
    config_path = directory / "config.json"
    try:
        sampling = _check_sampling(config.get("sampling"))
        architecture = get_architecture(config.get("architecture", "flux"))
        settings = _settings(config, kind, sampling)
    except ValueError as error:
        raise DataError(f"adapter file {config_path}: {error}") from None
    expected_class = config.get("base_class") or architecture.base_class
    if expected_class and type(transformer).__name__ != expected_class:
        raise DataError(f"adapter file {config_path}: the adapter is for a {expected_class}, got a "
                        f"{type(transformer).__name__}")
    if name is str:
        _check_piflow_class_name(config, kind, expected_class or type(transformer).__name__, config_path)
    lora = {k: v for k, v in tensors.items() if k.startswith("lora.")}
    lora_config = config.get("lora_config")
    if lora and lora_config is None:
        raise DataError(f"adapter file {weights_path} holds LoRA tensors (first: {name(min(lora))!r}) but "
                        f"{config_path} has no lora_config")
    if lora_config is not None:
        lora_config = _check_lora_config(lora_config, directory)
        _check_lora_rank(lora, lora_config["rank"], weights_path, name)
    if strength != 1 and lora_config is None:
        raise ValueError(f"strength={strength!r} scales the LoRA, but adapter {directory} has none")
    try:                                         # builds the head and final norm; the transformer is not touched yet
        student = DiffusersPolicyStudent(
            transformer, kind, architecture=architecture, num_components=policy.get("num_components", 8),
            num_nodes=policy.get("num_nodes", 10), dx_mode=policy.get("mode", "grid"),
            latent_channels=policy["latent_channels"], logstd_hidden=policy.get("logstd_hidden", 1024),
            share_transformer=True, policy_kwargs={k: policy[k] for k in POLICY_SETTINGS[kind] if k in policy},
            settings=settings, scheduler_config=config.get("scheduler_config"))
    except (TypeError, ValueError) as error:
        raise DataError(f"adapter file {weights_path}: its policy_config {policy} does not fit this "
                        f"{type(transformer).__name__} ({error})") from None
    own = {k: v for k, v in tensors.items() if not k.startswith("lora.")}
    check_adapter_tensors(_student_tensors(student), own, weights_path, name, strict)
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(adapter_name)   # loading again replaces the adapter of that name
    if lora_config is not None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict

        try:
            add_student_lora(transformer, rank=lora_config["rank"], alpha=lora_config["alpha"],
                             dropout=lora_config["dropout"], target_modules=lora_config["target_modules"],
                             adapter_name=adapter_name)
        except ValueError as error:                               # PEFT: no module matches a target
            unload_piflow_adapter(transformer, adapter_name)
            raise DataError(f"adapter file {config_path}: lora_config.target_modules "
                            f"{lora_config['target_modules']} do not fit this {type(transformer).__name__} "
                            f"({str(error).splitlines()[0]})") from None
        try:
            expected = {f"lora.{k}": v.shape
                        for k, v in get_peft_model_state_dict(transformer, adapter_name=adapter_name).items()}
            check_adapter_tensors(expected, lora, weights_path, name, strict)
            set_peft_model_state_dict(transformer, {k[len("lora."):]: v for k, v in lora.items() if k in expected},
                                      adapter_name=adapter_name)
        except BaseException:
            unload_piflow_adapter(transformer, adapter_name)      # no half-loaded adapter stays behind
            raise
        set_lora_strength(transformer, strength, adapter_name)
    for module, prefix in ((student.head, "head."), (student.norm_out, "norm_out.")):
        module.load_state_dict({k[len(prefix):]: v for k, v in own.items() if k.startswith(prefix)}, strict=False)
    return student.eval()


def unload_piflow_adapter(transformer: torch.nn.Module, adapter_name: str = LORA_ADAPTER) -> None:
    """Remove the π-Flow LoRA `adapter_name` from `transformer` (a no-op when it has none); once no PEFT adapter is
    left, the LoRA layers are unwrapped too, so the transformer computes exactly what the stock one does. The
    student's head and final norm live in the student, not the transformer: drop the student."""
    if adapter_name in (getattr(transformer, "peft_config", None) or {}):
        transformer.delete_adapters(adapter_name)
    if getattr(transformer, "_hf_peft_config_loaded", False) and not getattr(transformer, "peft_config", None):
        transformer.unload_lora()
