"""What every family file builds on: the `Family` and `Architecture` records, the text-to-image default schedule,
token packing and the condition collation the families share. Imports neither diffusers nor the models.

Shapes: latents (B, C, H, W) — (B, C, T, H, W) for video; 2×2-packed tokens (B, (H/2)(W/2), 4C).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from piflow.integrations.diffusers.families.calls import PipelineHooks
from piflow.rollout import DEFAULT_TOTAL_SUBSTEPS

PATCH = 2
# §4.7: the text-to-image schedule every family is distilled and sampled on unless a run says otherwise (the recipe's
# distill defaults, students built without settings, adapters without piflow's metadata — the authors' own folders)
TEXT_TO_IMAGE_SCHEDULE = {"nfe": 4, "shift": 3.2, "final_step_size_scale": 0.5,
                          "total_substeps": DEFAULT_TOTAL_SUBSTEPS}
REFERENCE_PREFIX = "reference_latents."     # cond / cache keys of reference latents: reference_latents.0, …
NULL_PREFIX = "null."                       # per-item negative embeddings: null.encoder_hidden_states, …


# ------------------------------------------------------------------------------------------------- token layouts
def pack_latents(latents: Tensor, patch: int = PATCH) -> Tensor:
    """(B, C, H, W) → (B, (H/p)(W/p), C·p²) tokens, channel index c·p² + row·p + col (FLUX packing)."""
    batch, channels, height, width = latents.shape
    if height % patch or width % patch:
        raise ValueError(f"latent height and width must be divisible by {patch}, got {height}×{width}")
    tokens = latents.reshape(batch, channels, height // patch, patch, width // patch, patch)
    return tokens.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // patch) * (width // patch), channels * patch ** 2)


def unpack_tokens(tokens: Tensor, height: int, width: int, patch: int = PATCH) -> Tensor:
    """Inverse of `pack_latents`: (B, L, C·p²) → (B, C, H, W)."""
    batch, length, features = tokens.shape
    channels = features // patch ** 2
    if length != (height // patch) * (width // patch) or features % patch ** 2:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match a {height}×{width} latent with patch {patch}")
    x = tokens.reshape(batch, height // patch, width // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(batch, channels, height, width)


def unpatchify_pqc(tokens: Tensor, height: int, width: int, patch: int) -> Tensor:
    """SD3/DiT token layout (B, (H/p)(W/p), p·p·c) with (p_row, p_col, c) order → (B, c, H, W)."""
    batch, length, features = tokens.shape
    channels = features // patch ** 2
    x = tokens.reshape(batch, height // patch, width // patch, patch, patch, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, channels, height, width)


def check_cond(cond: Any, required: tuple[str, ...], name: str) -> dict:
    """A copy of the `cond` dict, which must hold `required` tensors for model family `name`."""
    if not isinstance(cond, dict) or any(key not in cond for key in required):
        raise ValueError(f"cond must be a dict with {', '.join(required)} for {name}")
    return dict(cond)


def reference_latents(cond: dict) -> list[Tensor]:
    """The (B, C, h, w) reference latents of a collated `cond`, in order (empty for text-to-image)."""
    names = sorted((k for k in cond if k.startswith(REFERENCE_PREFIX)), key=lambda k: int(k[len(REFERENCE_PREFIX):]))
    return [cond[name] for name in names]


def packed_with_references(latents: Tensor, cond: dict) -> tuple[Tensor, list[tuple[int, int]]]:
    """The 2×2-packed generated tokens followed by each reference image's clean tokens (B, L + Σ L_j, 4C), and the
    token grid (rows, cols) of every image, the generated one first."""
    images = [latents]
    for number, reference in enumerate(reference_latents(cond)):
        if reference.shape[:2] != latents.shape[:2]:
            raise ValueError(f"reference image {number}: latents {tuple(reference.shape)} must have the batch and "
                             f"channels of the generated latents {tuple(latents.shape[:2])}")
        images.append(reference.to(latents.dtype))
    grids = [(image.shape[2] // PATCH, image.shape[3] // PATCH) for image in images]
    return torch.cat([pack_latents(image) for image in images], dim=1), grids


# ------------------------------------------------------------------------------------------------------ collation
def pad_stack(embeds: Sequence[Tensor], device=None, dtype=None) -> tuple[Tensor, Tensor]:
    """(L_i, D) embeddings → zero-padded (B, L, D) and the validity mask (B, L) (long)."""
    length = max(e.shape[0] for e in embeds)
    padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
    mask = torch.stack([torch.arange(length) < e.shape[0] for e in embeds]).long()
    return padded.to(device=device, dtype=dtype), mask.to(device)


def collate_padded(items: Sequence[dict], device=None, dtype=None) -> dict:
    """Text embeddings the pipelines pad to a fixed length themselves (FLUX.2, Wan): stacked (padded if needed)."""
    padded, _ = pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    return {"encoder_hidden_states": padded}


def collate_masked(items: Sequence[dict], device=None, dtype=None) -> dict:
    """Variable-length embeddings (Qwen-Image, Z-Image): padded (B, L, D) and their mask (B, L)."""
    padded, mask = pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    return {"encoder_hidden_states": padded, "encoder_hidden_states_mask": mask}


def collate_pooled(items: Sequence[dict], device=None, dtype=None) -> dict:
    """Sequence embeddings (B, L, D) and pooled embeddings (B, D') (SD3, FLUX.1)."""
    padded, _ = pad_stack([item["encoder_hidden_states"] for item in items], device, dtype)
    pooled = torch.stack([item["pooled_projections"] for item in items]).to(device=device, dtype=dtype)
    return {"encoder_hidden_states": padded, "pooled_projections": pooled}


def masked_items(embeds: Tensor, mask: Optional[Tensor]) -> list[dict]:
    """Per-item text dicts of padded (B, L, D) embeddings, each cut to its mask's length (L_i, D)."""
    lengths = [embeds.shape[1]] * embeds.shape[0] if mask is None else mask.sum(dim=1).tolist()
    return [{"encoder_hidden_states": e[:int(n)]} for e, n in zip(embeds, lengths)]


# ---------------------------------------------------------------------------------------------------- the records
def _temb_from_norm_args(args: tuple, kwargs: dict, output: Any) -> Tensor:
    """The conditioning embedding given to an adaptive final norm ``norm_out(tokens, temb)``."""
    return args[1] if len(args) > 1 else kwargs.get("conditioning_embedding", kwargs.get("emb"))


def _first_output(output: Any) -> Tensor:
    return output[0]


@dataclass(frozen=True)
class AuthorsClasses:
    """The authors' (Lakonik/piFlow) model classes for one base architecture (`authors_layout`)."""

    gm: str                          # their GM class, e.g. GMFluxTransformer2DModel
    dx: str                          # what their exporter writes for DX (their loader needs the base class name)
    base: str                        # the diffusers base class, e.g. FluxTransformer2DModel
    gm_base_fields: tuple[str, ...]  # base-config fields their GM constructor takes


# the scheduler-config keys that define a diffusion model's training schedule and output (what adapters save)
SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
                 "rescale_betas_zero_snr", "timestep_spacing")
DIFFUSION_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def schedule_config(config: Any) -> dict:
    """The `SCHEDULE_KEYS` of a diffusers scheduler (or its config mapping), as plain JSON values."""
    if not isinstance(config, Mapping):
        config = getattr(config, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError("a scheduler config must be a diffusers scheduler or a mapping")
    kept = {key: config[key] for key in SCHEDULE_KEYS if key in config}
    if kept.get("trained_betas") is not None:
        kept["trained_betas"] = [float(b) for b in kept["trained_betas"]]
    return kept


@dataclass(frozen=True)
class Parametrisation:
    """How a diffusion network (ε-, v- or x0-prediction on a discrete VP schedule) becomes a flow teacher — the one
    declaration the teacher (`DiffusersTeacher`) and the student (`DiffusersPolicyStudent`) of a diffusion
    architecture share (docs/algorithm.md §15). Flow-matching architectures have none.

    * scheduler_config: the schedule of the published checkpoints (a diffusers scheduler config: num_train_timesteps,
      beta_start, beta_end, beta_schedule, trained_betas, prediction_type, rescale_betas_zero_snr); a pipeline's own
      scheduler config replaces it where one is at hand (the recipe reads the pipeline folder's, adapters save theirs);
    * prediction_type: what the network predicts; None: the scheduler config's (it must be epsilon, v_prediction or
      sample, else a one-line ValueError);
    * out_channels(transformer): how many leading output channels are the prediction (learned-variance models
      output 2C: PixArt, DiT, DeepFloyd IF); None: all of them;
    * timestep_input: the network's time input ("t": the fractional timestep, see `DiffusionTeacher`).

    `converter(transformer, scheduler_config)` builds the `DiffusionTeacher` whose `network_inputs(x_σ, σ) → (x_t, t)`
    and `velocity_from_output(out, x_t, t) → u` are the only conversion code both sides run: the architecture's
    ``model_inputs`` then receives (x_t, t, cond) instead of (x_σ, σ, cond).
    """

    scheduler_config: Mapping[str, Any]
    prediction_type: Optional[str] = None
    out_channels: Optional[Callable[[nn.Module], Optional[int]]] = None
    timestep_input: Union[str, float] = "t"
    name: str = field(default="", compare=False)

    def resolved_config(self, scheduler_config: Any = None) -> dict:
        """The schedule keys of `scheduler_config` (default: the declared one)."""
        return schedule_config(self.scheduler_config if scheduler_config is None else scheduler_config)

    def schedule(self, scheduler_config: Any = None):
        """(the `DiscreteVPSchedule`, the prediction type) of `scheduler_config` (default: the declared one); a
        one-line ValueError for a prediction type or schedule piflow cannot convert."""
        from piflow.diffusion import DiscreteVPSchedule

        config = self.resolved_config(scheduler_config)
        kind = self.prediction_type or config.get("prediction_type", "epsilon")
        what = f"{self.name}: " if self.name else ""
        if kind not in DIFFUSION_PREDICTIONS:
            raise ValueError(f"{what}the scheduler's prediction_type {kind!r} is not a diffusion parametrisation "
                             f"piflow converts; expected one of {', '.join(DIFFUSION_PREDICTIONS)}")
        try:
            return DiscreteVPSchedule.from_diffusers_config(dict(config, prediction_type=kind)), kind
        except ValueError as error:
            raise ValueError(f"{what}scheduler config: {error}") from None

    def converter(self, transformer: nn.Module, scheduler_config: Any = None):
        """The `piflow.diffusion.DiffusionTeacher` of `transformer` under `scheduler_config` (default: the declared
        one; errors as `schedule`)."""
        from piflow.diffusion import DiffusionTeacher

        schedule, kind = self.schedule(scheduler_config)
        keep = self.out_channels(transformer) if self.out_channels is not None else None
        return DiffusionTeacher(transformer, schedule, kind, out_channels=keep, timestep_input=self.timestep_input)


@dataclass(frozen=True)
class Architecture:
    """How a transformer family takes latents and lays out its output tokens — the bring-your-own-teacher protocol.

    A velocity transformer qualifies when its last layers are a conditioned final norm followed by a linear
    ``projection`` to per-token latent patches. Declare the rest here and `register_architecture` it:
    * model_inputs(latents (B, C, *size), σ (B,), cond dict) → forward kwargs (σ → the model's timestep units,
      packing, position ids, reference/conditioning tokens);
    * tokens_to_latents(tokens (B, L, C·|patch|), *size, patch) → (B, C, *size): how output tokens map back to
      latents (size is (H, W) for images, (T, H, W) for video; `patch` is what `patch_size` returns);
    * layout: "cp" (channel-major within a token, FLUX/Qwen packing) or "pc" (patch-major, SD3/DiT/Wan);
    * output_is_tokens: the model returns tokens (unpatchify here) or latents (it unpatchifies itself);
    * lora_targets(transformer) → PEFT target_modules (feed-forward and timestep MLPs, never attention, §6.6);
    * packs_outside: the 2×2 packing happens in model_inputs (FLUX, Qwen: patch 2) or inside the model (SD3: the
      model's ``config.patch_size``); `patch_size(transformer)` overrides both (Wan: (1, 2, 2));
    * base_class: the transformer class name written into adapter folders;
    * the final layers, read through hooks so the model's code runs unchanged: `final_norm` (dotted path of the
      module, or parameter, of which the student trains its own copy: FLUX's ``norm_out``, Wan's
      ``scale_shift_table``), `projection` (path of the output linear: the head is initialised from it and the
      tokens entering it are captured; only the first L = |size / patch| tokens — the generated ones, ahead of
      any reference or caption tokens — are used), `temb_module` + `read_temb(args, kwargs, output)` (a forward
      hook that reads the conditioning embedding (B, D) the GM log-std MLP sees) and `cond_dim(transformer)` = D;
    * read_output(forward output with return_dict=False) → the model's prediction; `output_sign` −1 for models
      that predict x0 − ε instead of the velocity ε − x0 (the head's initial projection is negated likewise);
    * alias: names the documented aliases ``<alias>Teacher`` / ``<alias>PolicyStudent`` (e.g. "Flux");
    * authors: the authors' model classes, for architectures they publish adapters of (`authors_layout`);
    * parametrisation: None for flow-matching models (model_inputs gets (latents, σ) and the output is the velocity
      times `output_sign`); a `Parametrisation` for diffusion models (PixArt-α): model_inputs then gets the
      network's inputs (x_t, t) = ``converter.network_inputs(x_σ, σ)`` and the output (after `tokens_to_latents`)
      goes through ``converter.velocity_from_output`` — for the teacher and, per GM component / DX node, the
      student (`students`);
    * prepare_network(transformer): called once on the transformer by every teacher and student built on it, before
      use (DiT: its class-label dropout off, so that train mode never drops a class); None: nothing to do.
    """

    name: str
    model_inputs: Callable[[Tensor, Tensor, dict], dict]           # (latents, σ (B,), cond) → forward kwargs
    tokens_to_latents: Callable[..., Tensor]                      # (tokens, *size, patch) → (B, c, *size)
    layout: str                                                   # GMHead layout of a token's outputs
    output_is_tokens: bool                                        # the model returns tokens (FLUX) or latents (SD3)
    lora_targets: Callable[[nn.Module], Any]                      # transformer → PEFT target_modules
    packs_outside: bool = True                                    # 2×2 packing done here (FLUX, Qwen) or inside
    base_class: str = ""                                          # e.g. "FluxTransformer2DModel"
    final_norm: str = "norm_out"
    projection: str = "proj_out"
    temb_module: str = "norm_out"
    read_temb: Callable[[tuple, dict, Any], Tensor] = _temb_from_norm_args
    cond_dim: Callable[[nn.Module], int] = lambda transformer: transformer.norm_out.linear.in_features
    patch_size: Optional[Callable[[nn.Module], Any]] = None
    read_output: Callable[[Any], Tensor] = _first_output
    output_sign: float = 1.0
    alias: str = ""
    authors: Optional[AuthorsClasses] = None
    parametrisation: Optional[Parametrisation] = None
    prepare_network: Optional[Callable[[nn.Module], None]] = None


@dataclass(frozen=True)
class Family:
    """One base-model family: its diffusers classes, student `Architecture`, condition encoding and guidance, and
    the hooks of its π-Flow pipeline.

    Per condition (one prompt, with its reference images for editing families) `encode(pipe, prompts,
    max_sequence_length, references)` returns a dict of tensors without the batch dimension, `collate(items,
    device, dtype)` pads and batches such dicts into the ``cond`` the students and teachers take, and
    `item_names` are the tensors a prompt cache must hold per item. guidance: "embedded" (the teacher and student
    take the distilled-guidance scalar ``cond["guidance"]``, FLUX.1 [dev]), "cfg" (true classifier-free guidance
    of the teacher against the negative prompt; the student has it distilled in) or "none". `latent_packing`:
    "outside" (2×2 packing of (C, H, W) latents into 4C-channel tokens done by piflow: latent channels =
    in_channels / 4) or "inside" (the model patchifies: latent channels = in_channels). `video`: latents are
    (C, T, H, W). `references`: "none", "optional" (text-to-image and editing, FLUX.2) or "required"
    (Qwen-Image-Edit): conditions carry reference images, encoded into ``reference_latents.j`` (C, h, w) tensors
    (the model sees their clean tokens after the generated ones). `null_per_item`: the negative prompt is encoded
    with each condition's reference images (Qwen-Image-Edit's vision-language encoder sees the image), stored as
    ``null.<name>`` beside the condition's own tensors: such a family's `encode` takes the negative prompt as a
    fifth argument. `pipeline`: the `PipelineHooks` of its π-Flow pipeline; `tiny(latent_channels, seed)`: the
    stock pipeline's components at toy size with random weights (tests, offline smoke runs). `denoiser`: the
    pipeline component the students and teachers run ("transformer", or "unet" for the UNet families SD 1.5 and
    SDXL); `transformer_class` is its class either way."""

    name: str
    architecture: str
    transformer_class: str
    stock_pipeline: str
    pi_pipeline: str
    encode: Callable[..., list]
    collate: Callable[..., dict]
    item_names: tuple[str, ...]
    pipeline: PipelineHooks
    tiny: Callable[[int, int], dict]
    guidance: str = "cfg"
    guidance_scale: float = 4.0
    latent_packing: str = "outside"
    references: str = "none"
    null_per_item: bool = False
    video: bool = False
    denoiser: str = "transformer"
