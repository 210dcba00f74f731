"""Text conditions for distillation: a prompt file, prompt embeddings encoded on the fly by a pipeline's text
encoders, or pre-computed into a cache of sharded safetensors (``piflow encode-prompts``).

Every source returns, per prompt, a dict of tensors without the batch dimension:
* FLUX: ``encoder_hidden_states`` (L, D) (T5), ``pooled_projections`` (D',) (CLIP);
* SD3: ``encoder_hidden_states`` (L, D) (CLIP ⊕ T5), ``pooled_projections`` (D',);
* Qwen-Image: ``encoder_hidden_states`` (L_i, D), the valid tokens only (lengths differ between prompts);
* the other families: see `piflow.integrations.diffusers.families` (the one table of what each family encodes).
`collate_text` pads and batches them into the `cond` dict the students and teachers take.

Editing families (Qwen-Image-Edit, FLUX.2 with references) take conditions — a prompt and its reference images,
from a JSON Lines conditions file (`read_conditions_file`) — and cache the VAE-encoded reference latents
``reference_latents.j`` (C, h, w) beside the text embeddings; where the negative prompt sees the images
(Qwen-Image-Edit) its embeddings are cached per condition as ``null.<name>``.

Cache layout: ``index.json`` (architecture, num_prompts, shard file names, prompts per shard, max_sequence_length,
the reference image paths of editing caches), ``shard-00000.safetensors`` … holding ``<prompt index>.<name>``
tensors, ``null.safetensors`` (the negative / empty prompt, used by classifier-free guidance; absent where it is
per condition) and ``prompts.txt`` (the prompts, one per line). Written atomically, shard by shard, so an
interrupted encoding resumes at the first missing shard.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from piflow.errors import DataError
from piflow.integrations.diffusers.families import FAMILIES, NULL_PREFIX, REFERENCE_PREFIX, get_family
from piflow.files import atomic_write, first_non_finite, read_json, write_json


def _text_lines(path: Path, what: str, form: str) -> list[str]:
    """The lines of a UTF-8 text file; a missing or binary file is a one-line error naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist ({form})")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"{what} {path} is not UTF-8 text ({form})") from None


def read_prompt_file(path: Union[str, Path]) -> list[str]:
    """Prompts of a text file, one per line; blank lines and lines starting with '#' are skipped. An empty,
    whitespace-only or binary file is a one-line `DataError`."""
    path = Path(path)
    prompts = [line.strip() for line in _text_lines(path, "prompt file", "one prompt per line")]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts (one prompt per line)")
    return prompts


def read_conditions_file(path: Union[str, Path]) -> tuple[list[str], list[list[Path]]]:
    """(prompts, reference image paths per prompt) of an editing conditions file: JSON Lines, one object per
    condition, ``{"prompt": "make the sky red", "images": ["photos/a.jpg"]}`` (``"image"``: one path; relative
    paths are relative to the file's folder). Every image must exist; a bad line is a one-line `DataError`."""
    import json

    path = Path(path)
    prompts, images = [], []
    lines = _text_lines(path, "conditions file", 'JSON Lines: one {"prompt": …, "images": […]} per line')
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"conditions file {path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{where}: not a JSON object ({error.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise DataError(f'{where}: expected {{"prompt": "...", "images": ["..."]}}')
        paths = record.get("images", [record["image"]] if "image" in record else None)
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise DataError(f"{where}: images must be a non-empty list of image paths (the reference images)")
        resolved = [(path.parent / p) if not Path(p).is_absolute() else Path(p) for p in paths]
        missing = [str(p) for p in resolved if not p.is_file()]
        if missing:
            raise DataError(f"{where}: reference image {missing[0]} does not exist")
        prompts.append(record["prompt"])
        images.append(resolved)
    if not prompts:
        raise DataError(f"conditions file {path} holds no conditions")
    _check_reference_sizes(path, images)
    return prompts, images


def _check_reference_sizes(path: Path, images: list[list[Path]]) -> None:
    """The k-th reference images of all conditions have one size (they are batched together; a condition's
    references may differ among themselves): a `DataError` naming the first that differs. Only the image headers
    are read (Pillow opens lazily)."""
    from PIL import Image, UnidentifiedImageError

    first: dict[int, tuple[Path, tuple[int, int]]] = {}
    for references in images:
        for slot, reference in enumerate(references):
            try:
                with Image.open(reference) as image:
                    size = image.size
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"conditions file {path}: reference image {reference} is not a readable image "
                                f"({type(error).__name__})") from None
            seen = first.setdefault(slot, (reference, size))
            if size != seen[1]:
                raise DataError(f"conditions file {path}: reference image {reference} is {size[0]}x{size[1]} but "
                                f"{seen[0]} (reference {slot + 1} of an earlier condition) is {seen[1][0]}x"
                                f"{seen[1][1]}; the k-th reference images of all conditions need one size")


def read_condition_source(architecture: str, prompt_file: Optional[Union[str, Path]],
                          conditions_file: Optional[Union[str, Path]], options: tuple[str, str] = ("prompts=",
                                                                                                  "conditions="),
                          alternative: str = "") -> tuple[list[str], Optional[list[list[Path]]]]:
    """(prompts, reference image paths per prompt — None for a prompt file) of a run or cache: an editing family
    needs a conditions file, a text-to-image family a prompt file (optional-reference families take either).
    `options` name the two arguments in errors (CLI flags or config keys); `alternative` names another source."""
    from piflow.errors import ConfigError

    family = get_family(architecture)
    prompts_option, conditions_option = options
    if conditions_file is not None:
        if family.references == "none":
            raise ConfigError(f"{conditions_option} (reference images) applies to editing families; {architecture} "
                              f"is text-to-image: give {prompts_option}<prompt file>")
        return read_conditions_file(conditions_file)
    if family.references == "required":
        raise ConfigError(f"{architecture} is an editing family: give {conditions_option}<JSON Lines file, one "
                          f'{{"prompt": ..., "images": [...]}} per line>{alternative}')
    if prompt_file is None:
        raise ConfigError(f"give {prompts_option}<prompt file>{alternative}")
    return read_prompt_file(prompt_file), None


def load_reference_images(paths: Sequence[Union[str, Path]]) -> list:
    """RGB PIL images of `paths` (decoded by Pillow, which runs no code from the file)."""
    from PIL import Image

    images = []
    for item in paths:
        if not isinstance(item, (str, Path)):
            images.append(item.convert("RGB"))       # already an image
            continue
        try:
            with Image.open(item) as image:
                images.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise DataError(f"reference image {item} cannot be read as an image ({error})") from None
    return images




def _check_images(family, prompts: Sequence[str], images: Optional[Sequence[Sequence[Any]]]) -> None:
    if images is None:
        if family.references == "required":
            raise ValueError(f"images: {family.name} is an editing family and needs the reference images of every "
                             "prompt (a conditions file: piflow encode-prompts --conditions conditions.jsonl)")
        return
    if family.references == "none":
        raise ValueError(f"images: {family.name} takes no reference images")
    if len(images) != len(prompts):
        raise ValueError(f"images must hold one list of reference images per prompt: {len(images)} for "
                         f"{len(prompts)} prompts")
    for number, refs in enumerate(images):
        if isinstance(refs, (str, Path)) or not len(refs):
            raise ValueError(f"images[{number}] must be a non-empty list of reference images (paths or PIL images)")


@torch.no_grad()
def encode_prompts(pipe: Any, architecture: str, prompts: Sequence[str], max_sequence_length: int = 512,
                   batch_size: int = 8, images: Optional[Sequence[Sequence[Any]]] = None,
                   negative_prompt: Optional[str] = None) -> list[dict[str, Tensor]]:
    """Encode `prompts` with the text encoders of a diffusers pipeline of family `architecture` (a name of
    `families.FAMILIES`: "flux", "sd3", "qwen", …); per-prompt dicts of CPU tensors. Editing families take
    `images`: per prompt, its reference images (paths or PIL images), VAE-encoded into ``reference_latents.j``;
    families whose negative prompt sees the reference images (``null_per_item``) also get `negative_prompt`
    encoded with each prompt's images as ``null.<name>``."""
    family = get_family(architecture)
    _check_images(family, prompts, images)
    results: list[dict[str, Tensor]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        references = None if images is None else [load_reference_images(refs)
                                                   for refs in images[start:start + batch_size]]
        per_item_null = family.null_per_item and negative_prompt is not None and references is not None
        items = (family.encode(pipe, chunk, max_sequence_length, references, negative_prompt) if per_item_null
                 else family.encode(pipe, chunk, max_sequence_length, references))
        results.extend({k: v.detach().cpu().contiguous() for k, v in item.items()} for item in items)
    return results


def _split_item(item: dict[str, Tensor]) -> tuple[dict, dict, dict]:
    """(text tensors, reference latents, per-item negative text tensors) of one condition."""
    text, references, null = {}, {}, {}
    for key, value in item.items():
        if key.startswith(REFERENCE_PREFIX):
            references[key] = value
        elif key.startswith(NULL_PREFIX):
            null[key[len(NULL_PREFIX):]] = value
        else:
            text[key] = value
    return text, references, null


def collate_text(items: Sequence[dict[str, Tensor]], architecture: str, device=None, dtype=None) -> dict:
    """Batch per-prompt dicts into the model `cond` of family `architecture` (pads, masks, position ids);
    reference latents are stacked (every condition of a batch needs the same number and sizes of reference
    images) and per-item negatives become ``cond["null"]``, a cond of their own."""
    if not items:
        raise ValueError("collate_text needs at least one prompt")
    family = get_family(architecture)
    parts = [_split_item(item) for item in items]
    cond = family.collate([text for text, _, _ in parts], device, dtype)
    names = sorted(parts[0][1], key=lambda k: int(k[len(REFERENCE_PREFIX):]))
    for number, (_, references, _) in enumerate(parts):
        if sorted(references, key=lambda k: int(k[len(REFERENCE_PREFIX):])) != names:
            raise ValueError(f"images: condition {number} of the batch has {len(references)} reference images, "
                             f"condition 0 has {len(names)}; a batch needs the same number per condition")
    for name in names:
        shapes = {tuple(refs[name].shape) for _, refs, _ in parts}
        if len(shapes) > 1:
            raise ValueError(f"images: reference image {name[len(REFERENCE_PREFIX):]} has latent shapes "
                             f"{sorted(shapes)} within one batch; resize the references of a batch alike")
        cond[name] = torch.stack([refs[name] for _, refs, _ in parts]).to(device=device, dtype=dtype)
    if any(null for _, _, null in parts):
        if not all(null for _, _, null in parts):
            raise ValueError("every condition of a batch needs its negative (null.*) embeddings, or none")
        cond["null"] = family.collate([null for _, _, null in parts], device, dtype)
    return cond


def _null_of(pipe: Any, family, negative_prompt: str, max_sequence_length: int) -> Optional[dict[str, Tensor]]:
    """The shared negative-prompt embedding, or None for families whose negative is encoded per item. A pipeline
    configured with ``force_zeros_for_empty_prompt`` (SDXL) gets all-zero embeddings for the empty negative prompt,
    as its stock CFG uses."""
    if family.null_per_item:
        return None
    null = encode_prompts(pipe, family.name, [negative_prompt], max_sequence_length)[0]
    config = getattr(pipe, "config", None) or {}
    if negative_prompt == "" and config.get("force_zeros_for_empty_prompt", False):
        null = {name: torch.zeros_like(value) for name, value in null.items()}
    return null


class EncodedPrompts:
    """Prompt embeddings (and, for editing families, reference latents) computed now by `pipe`'s encoders and
    kept in memory (small prompt sets). `images`: per prompt, its reference images."""

    def __init__(self, pipe: Any, architecture: str, prompts: Sequence[str], negative_prompt: str = "",
                 max_sequence_length: int = 512, images: Optional[Sequence[Sequence[Any]]] = None):
        self.architecture = architecture
        self.prompts = list(prompts)
        self.images = None if images is None else [list(refs) for refs in images]
        family = get_family(architecture)
        encoded = encode_prompts(pipe, architecture, self.prompts, max_sequence_length, images=self.images,
                                 negative_prompt=negative_prompt)
        self.items = [_checked(item, f"embedding of prompt {i} ({prompt[:40]!r})") for i, (prompt, item) in
                      enumerate(zip(self.prompts, encoded))]
        null = _null_of(pipe, family, negative_prompt, max_sequence_length)
        self.null_item = None if null is None else _checked(null, "embedding of the negative prompt")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return self.items[index]

    def null(self) -> Optional[dict[str, Tensor]]:
        """The negative-prompt embedding; None where every item carries its own (``null.*``)."""
        return self.null_item


def write_prompt_cache(pipe: Any, architecture: str, prompts: Sequence[str], directory: Union[str, Path],
                       negative_prompt: str = "", shard_size: int = 1000, max_sequence_length: int = 512,
                       progress: bool = True, images: Optional[Sequence[Sequence[Union[str, Path]]]] = None) -> Path:
    """Encode `prompts` (with their reference `images`, paths, for editing families) into `directory` (sharded
    safetensors, see the module docstring); resumable."""
    from safetensors.torch import save as safetensors_bytes

    from piflow.progress import progress_bar

    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    family = get_family(architecture)
    _check_images(family, prompts, images)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    num_shards = (len(prompts) + shard_size - 1) // shard_size
    names = [f"shard-{i:05d}.safetensors" for i in range(num_shards)]

    def write_tensors(path: Path, tensors: dict[str, Tensor]) -> None:
        atomic_write(path, safetensors_bytes(tensors))

    bar = progress_bar(len(names), "encoding prompts (shards)", enabled=progress)
    for shard, name in enumerate(names):
        if not (directory / name).is_file():          # written shards are kept: an interrupted run resumes
            start = shard * shard_size
            items = encode_prompts(pipe, architecture, prompts[start:start + shard_size], max_sequence_length,
                                   images=None if images is None else images[start:start + shard_size],
                                   negative_prompt=negative_prompt)
            write_tensors(directory / name, {f"{start + i}.{k}": v for i, item in enumerate(items)
                                             for k, v in item.items()})
        bar.update(1)
    bar.close()
    null = _null_of(pipe, family, negative_prompt, max_sequence_length)
    if null is not None:
        write_tensors(directory / "null.safetensors", null)
    atomic_write(directory / "prompts.txt", "\n".join(prompts).encode("utf-8"))
    index = {"format": "piflow-prompt-cache-v1", "architecture": architecture, "num_prompts": len(prompts),
             "shard_size": shard_size, "shards": names, "negative_prompt": negative_prompt,
             "max_sequence_length": max_sequence_length}
    if images is not None:     # the conditions, for sample grids and for the record
        index["images"] = [[str(path) for path in refs] for refs in images]
    write_json(directory / "index.json", index)
    return directory


class PromptEmbeddingCache:
    """Random access to a cache written by `write_prompt_cache`. The index and every shard's header are checked when
    the cache is opened; the embeddings themselves are checked for NaN/Inf when read (a `DataError` names the
    shard and prompt)."""

    def __init__(self, directory: Union[str, Path], architecture: Optional[str] = None):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.directory} is not a prompt cache (no index.json); write one with "
                                    "`piflow encode-prompts`")
        self.index = read_json(index_path, "prompt cache index")
        required = ("architecture", "num_prompts", "shard_size", "shards")
        missing_keys = [k for k in required if not isinstance(self.index, dict) or k not in self.index]
        if missing_keys:
            raise DataError(f"prompt cache index {index_path} is not a piflow prompt cache index (missing "
                            f"{missing_keys}); rewrite it with `piflow encode-prompts`")
        self._check_index(index_path)
        self.architecture = self.index["architecture"]
        if architecture is not None and architecture != self.architecture:
            raise DataError(f"prompt cache {self.directory} was encoded for {self.architecture!r}, "
                             f"not {architecture!r}")
        missing = [name for name in self.index["shards"] if not (self.directory / name).is_file()]
        if missing:
            raise FileNotFoundError(f"prompt cache {self.directory} misses shards {missing[:3]}")
        self._handles: dict[int, Any] = {}
        family = FAMILIES.get(self.architecture)
        required = set(family.item_names if family is not None else ("encoder_hidden_states",))
        if family is not None and family.references == "required":
            required.add(REFERENCE_PREFIX + "0")
        self.null_per_item = family is not None and family.null_per_item
        for shard in range(len(self.index["shards"])):    # every shard's header, now: not mid-training
            names: dict[int, set] = {}
            for key in self._shard(shard).keys():
                prefix, _, name = key.partition(".")
                if prefix.isdigit():
                    names.setdefault(int(prefix), set()).add(name)
            start = shard * self.index["shard_size"]
            for prompt in range(start, min(start + self.index["shard_size"], self.index["num_prompts"])):
                lacking = sorted(required - names.get(prompt, set()))
                if lacking:
                    raise DataError(f"prompt cache shard {self.directory / self.index['shards'][shard]} lacks "
                                    f"{lacking} of prompt {prompt}; rewrite the cache with `piflow encode-prompts`")

    def _check_index(self, index_path: Path) -> None:
        """Types and consistency of index.json; shard names must be plain file names inside the cache folder."""
        index = self.index
        count, size, shards = index["num_prompts"], index["shard_size"], index["shards"]
        for key, value in (("num_prompts", count), ("shard_size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"prompt cache index {index_path}: {key} must be an integer >= 1, got {value!r}")
        if not isinstance(shards, list) or len(shards) != -(-count // size):
            raise DataError(f"prompt cache index {index_path}: shards must list {-(-count // size)} files "
                            f"({count} prompts, {size} per shard)")
        for name in shards:
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") \
                    or not name.endswith(".safetensors"):
                raise DataError(f"prompt cache index {index_path}: shard {name!r} must be a .safetensors file name "
                                f"inside the cache folder")

    def __len__(self) -> int:
        return int(self.index["num_prompts"])

    def _shard(self, shard: int):
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.directory / self.index["shards"][shard]
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as error:     # SafetensorError: truncated or not safetensors
                raise DataError(f"prompt cache shard {path} is corrupt or truncated ({type(error).__name__}); "
                                f"delete it and rerun `piflow encode-prompts` to rewrite it") from None
        return self._handles[shard]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"prompt index {index} out of range [0, {len(self)})")
        shard = index // int(self.index["shard_size"])
        handle = self._shard(shard)
        prefix = f"{index}."
        item = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
        where = f"prompt cache shard {self.directory / self.index['shards'][shard]}"
        if not item:
            raise DataError(f"{where} holds no embeddings for prompt {index}")
        return _checked(item, f"{where}, prompt {index}")

    @property
    def images(self) -> Optional[list[list[str]]]:
        """The reference image paths of each condition (editing caches), as encoded."""
        return self.index.get("images")

    @property
    def prompts(self) -> list[str]:
        path = self.directory / "prompts.txt"
        return path.read_text(encoding="utf-8").split("\n") if path.is_file() else []

    def null(self) -> Optional[dict[str, Tensor]]:
        """The negative-prompt embedding; None where every item carries its own (``null.*``)."""
        from piflow.files import load_safetensors

        if self.null_per_item:
            return None

        path = self.directory / "null.safetensors"
        try:
            return _checked(load_safetensors(path, "prompt cache file"), str(path))
        except (ValueError, FileNotFoundError) as error:
            raise DataError(str(error)) from None


def _checked(item: dict[str, Tensor], where: str) -> dict[str, Tensor]:
    """`item` if every tensor is finite, else a `DataError` naming `where` and the tensor."""
    bad = first_non_finite(item)
    if bad is not None:
        raise DataError(f"{where}: {bad} holds NaN or Inf values")
    return item
