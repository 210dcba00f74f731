"""Hub-ready adapters: the model card of an exported adapter folder and its upload to the Hugging Face Hub.

`write_model_card` writes ``README.md`` with the Hub's YAML front matter (``base_model``, ``library_name: diffusers``,
``pipeline_tag``, tags, the base model's licence) and a body stating the training settings, the recommended sampling
settings, a usage snippet that runs as written and the run's measured figures. The licence is read from the base
model's own card where piflow can read it without a network (a local pipeline folder's ``README.md``, or the card in
the local Hugging Face cache); otherwise the card says ``license: other`` and tells the reader to check the base.

`push_to_hub` uploads the folder's files as one commit (the Hub applies a commit whole or not at all), after
checking for a token and that the Hub is not switched off (``HF_HUB_OFFLINE``); any failure is a one-line
`HubError`, and nothing is reported as uploaded unless the commit returned.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from piflow.errors import UserError

CARD_NAME = "README.md"
LOCAL_ONLY = ("export.json",)
TAGS = ("pi-flow", "few-step", "lora", "diffusers", "distillation")
# everything the Hub's own card parser needs is in the front matter; these keys of the base card are carried over
LICENSE_KEYS = ("license", "license_name", "license_link")
HUB_CACHE_PATTERN = re.compile(r"models--([^/\\]+)--([^/\\]+)[/\\]snapshots[/\\]")


class HubError(UserError):
    """An upload that cannot start or did not finish (no token, offline, refused by the Hub)."""


def pipeline_tag(family: str) -> str:
    """The Hub's task of a family's π-Flow pipeline: text-to-video, image-to-image (editing with required
    references) or text-to-image."""
    from piflow.integrations.diffusers.families import get_family

    spec = get_family(family)
    if spec.video:
        return "text-to-video"
    return "image-to-image" if spec.references == "required" else "text-to-image"


def hub_id_of(pipeline: str) -> Optional[str]:
    """The Hub id of a base pipeline given as a Hub id, or as a snapshot folder of the local Hugging Face cache
    (``…/models--org--name/snapshots/<sha>``); None for another local folder."""
    match = HUB_CACHE_PATTERN.search(str(pipeline))
    if match:
        return f"{match.group(1)}/{match.group(2)}"
    if Path(pipeline).exists():
        return None
    return str(pipeline) if re.fullmatch(r"[\w.-]+/[\w.-]+", str(pipeline)) else None


def base_card_metadata(pipeline: str) -> dict:
    """The licence keys of the base model's card (`LICENSE_KEYS`), read without a network: from ``README.md`` in a
    local pipeline folder, or from the local Hugging Face cache for a Hub id; {} when there is none."""
    from huggingface_hub import ModelCard

    card_path = Path(pipeline) / CARD_NAME
    if not card_path.is_file():
        repo = hub_id_of(pipeline)
        if repo is None:
            return {}
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo, CARD_NAME)
        if not isinstance(cached, str):
            return {}
        card_path = Path(cached)
    try:
        data = ModelCard.load(card_path).data.to_dict()
    except (ValueError, OSError):
        return {}
    return {key: data[key] for key in LICENSE_KEYS if data.get(key)}


def _front_matter(metadata: dict) -> str:
    """YAML front matter (JSON-compatible values: strings, lists, numbers) between --- lines."""
    import yaml

    return "---\n" + yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True) + "---\n"


def _sampling(adapter_config: dict) -> dict:
    from piflow.integrations.diffusers.adapter import SAMPLING_DEFAULTS

    return {**SAMPLING_DEFAULTS, **(adapter_config.get("sampling") or {})}


def usage_snippet(family: str, base: str, adapter: str, resolution, nfe: int, prompt: str) -> str:
    """Python that loads the base with its π-Flow pipeline, adds the adapter and samples at the trained NFE."""
    from piflow.integrations.diffusers.families import get_family

    height, width = (int(v) for v in resolution)
    spec = get_family(family)
    lines = [
        "import torch",
        "from piflow.integrations.diffusers.pipelines import pipeline_class",
        "",
        'device = "cuda" if torch.cuda.is_available() else "cpu"',
        'dtype = torch.bfloat16 if device == "cuda" else torch.float32',
        f"pipe = pipeline_class({family!r}).from_pretrained({base!r}, torch_dtype=dtype).to(device)",
        f"pipe.load_piflow_adapter({adapter!r})",
    ]
    arguments = [repr(prompt), f"num_inference_steps={nfe}", f"height={height}", f"width={width}",
                 "generator=torch.Generator(device).manual_seed(0)"]
    if spec.references == "required":
        lines.insert(2, "from diffusers.utils import load_image")
        arguments.insert(1, 'image=load_image("input.png")')
    if spec.video:
        arguments.append("num_frames=81")
        lines.append(f"frames = pipe({', '.join(arguments)}).frames[0]")
        lines += ["from diffusers.utils import export_to_video", 'export_to_video(frames, "pi-flow.mp4", fps=16)']
    else:
        lines.append(f"image = pipe({', '.join(arguments)}).images[0]")
        lines.append('image.save("pi-flow.png")')
    return "\n".join(lines)


def model_card(adapter_dir: Path, config: dict, metrics: Optional[dict] = None, repo_id: Optional[str] = None,
               base_model: Optional[str] = None) -> str:
    """The README.md text of the adapter folder `adapter_dir` exported from a run with `config` (its resolved
    config.yaml) and `metrics` (its metrics.json, if any). The snippet loads the adapter from `repo_id` when given
    (the card of an upload), else from the folder's absolute path; `base_model` (a Hub id) overrides the one
    derived from ``pipeline``."""
    adapter_dir = Path(adapter_dir)
    adapter_config = json.loads((adapter_dir / "config.json").read_text())
    family = adapter_config["architecture"]
    base = str(config["pipeline"])
    base_id = base_model or hub_id_of(base)
    policy = adapter_config["policy_config"]
    lora = adapter_config.get("lora_config") or {}
    sampling = _sampling(adapter_config)
    settings = adapter_config.get("piid_settings") or {}
    nfe = int(sampling["nfe"])
    kind = "GM" if policy["type"] == "GMFlow" else "DX"
    metadata: dict[str, Any] = {}
    if base_id is not None:
        metadata["base_model"] = base_id
    metadata["library_name"] = "diffusers"
    metadata["pipeline_tag"] = pipeline_tag(family)
    metadata["tags"] = [*TAGS, f"{family}"]
    license_keys = base_card_metadata(base)
    metadata.update(license_keys or {"license": "other"})
    prompt = (config.get("eval") or {}).get("prompts") or ["a photo of a cat"]
    snippet = usage_snippet(family, base_id or base, repo_id or str(adapter_dir.resolve()), config["resolution"],
                            nfe, prompt[0])
    structure = (f"K = {policy['num_components']} components" if kind == "GM"
                 else f"N = {policy.get('num_nodes')} nodes")
    guidance = config.get("guidance") or {}
    train = config.get("train") or {}
    distill = config.get("distill") or {}
    rows = [
        ("method", "π-ID (policy-based imitation distillation), data-free" if distill.get("data_free", True)
         else "π-ID (policy-based imitation distillation) on data latents"),
        ("policy", f"{'GMFlow (Gaussian mixture)' if kind == 'GM' else 'DX (x0 grid)'}, {structure}"),
        ("LoRA", f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, on `{lora.get('target_modules')}`"),
        ("teacher guidance", f"scale {guidance.get('scale')}, interval {guidance.get('interval')}"),
        ("training", f"{train.get('iters')} iterations, batch {distill.get('batch_size')}, lr {train.get('lr')}, "
                     f"resolution {config['resolution'][0]}×{config['resolution'][1]}"),
        ("π-ID settings", ", ".join(f"{k} {v}" for k, v in settings.items())),
    ]
    measured = []
    export = adapter_dir / "export.json"
    if export.is_file():
        record = json.loads(export.read_text())
        measured.append(f"exported from step {record.get('step')} ({record.get('weights')} weights)")
    for key, label in (("iters", "iterations trained"), ("final_loss", "final π-ID loss"),
                       ("train_seconds", "training time (s)")):
        if metrics and metrics.get(key) is not None:
            value = metrics[key]
            measured.append(f"{label}: {value:.4g}" if isinstance(value, float) else f"{label}: {value}")
    licence_line = (f"The base model's licence (`{license_keys['license']}`) applies to this adapter and to what it "
                    f"generates." if license_keys else
                    "piflow could not read the base model's licence: check it on the base model's page before use.")
    title = f"π-Flow {kind} student of {base_id or Path(base).name} ({nfe} steps)"
    body = f"""
# {title}

A few-step LoRA adapter trained with piflow, an implementation of π-Flow
(Chen et al., "pi-Flow: Policy-Based Few-Step Generation via Imitation Distillation", ICLR 2026, arXiv 2510.14974).
The frozen base model is the teacher; the student is the base with this LoRA, its own final norm and a policy head
whose output is a network-free velocity field, rolled out between the {nfe} network evaluations.

## Usage

```python
{snippet}
```

`pip install piflow[diffusers]`. The adapter folder holds `config.json` (policy, LoRA, π-ID and sampling settings)
and `{'diffusion_pytorch_model.safetensors'}`; `pipe.load_piflow_adapter(..., strength=s)` scales the LoRA.

## Recommended sampling settings

| setting | value |
|---|---|
| network evaluations (`num_inference_steps`) | {nfe} (the trained NFE; the pipeline takes any) |
| time shift | {sampling['shift']} |
| final step size scale | {sampling['final_step_size_scale']} |
| total policy substeps | {sampling['total_substeps']} |
| temperature | `auto` (the pipeline default) |

Guidance is distilled in: sample without classifier-free guidance.

## Training settings

| setting | value |
|---|---|
""" + "\n".join(f"| {name} | {_cell(value)} |" for name, value in rows) + f"""

## Measured

{chr(10).join(f"- {line}" for line in measured) if measured else "- no figures were recorded for this run"}

## Licence

{licence_line}
"""
    return _front_matter(metadata) + body


def _cell(value: Any) -> str:
    """A markdown table cell: | escaped (LoRA target patterns are regular expressions)."""
    return str(value).replace("|", "\\|")


def write_model_card(adapter_dir: Path, run_dir: Path, repo_id: Optional[str] = None,
                     base_model: Optional[str] = None) -> Path:
    """Write ``README.md`` into the exported adapter folder of the text-to-image run `run_dir`."""
    from piflow.config import load_config
    from piflow.files import atomic_write
    from piflow.recipes.text_to_image import T2I_DISTILL_DEFAULTS

    config = load_config(T2I_DISTILL_DEFAULTS, Path(run_dir) / "config.yaml")
    metrics_path = Path(run_dir) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    text = model_card(Path(adapter_dir), config, metrics, repo_id, base_model)
    path = Path(adapter_dir) / CARD_NAME
    atomic_write(path, text.encode())
    return path


def push_to_hub(folder: Path, repo_id: str, private: bool = False, token: Optional[str] = None) -> str:
    """Upload `folder` to the model repository `repo_id` (created if missing) in one commit; returns the commit's
    URL. A missing token, ``HF_HUB_OFFLINE`` or an error from the Hub is a one-line `HubError`."""
    from huggingface_hub import HfApi, get_token

    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise HubError(f"--push-to-hub must be a Hub repository id 'user/name', got {repo_id!r}")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise HubError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (the adapter "
                       f"is saved in {folder})")
    token = token or get_token()
    if not token:
        raise HubError("--push-to-hub needs a Hugging Face token: set HF_TOKEN or run `hf auth login` (the adapter "
                       f"is saved in {folder})")
    from huggingface_hub import CommitOperationAdd

    folder = Path(folder)
    # the adapter's files (export.json stays local: it names the run directory on this machine)
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.name not in LOCAL_ONLY)
    operations = [CommitOperationAdd(path_in_repo=path.relative_to(folder).as_posix(), path_or_fileobj=str(path))
                  for path in files]
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        commit = api.create_commit(repo_id, operations, commit_message="Upload π-Flow adapter (piflow export)",
                                   repo_type="model")
    except Exception as error:        # noqa: BLE001 — HTTP, network and Hub errors alike: one line, nothing reported
        if isinstance(error, UserError):
            raise
        message = " ".join(str(error).split())[:300]
        raise HubError(f"--push-to-hub {repo_id}: the upload failed, nothing was committed ({message}); the "
                       f"adapter is saved in {folder}") from None
    return str(getattr(commit, "commit_url", None) or f"https://huggingface.co/{repo_id}")
