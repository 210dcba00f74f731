"""DiT (`DiTPipeline`, `DiTTransformer2DModel`: facebook/DiT-XL-2-256 / -512): a class-conditional ImageNet diffusion
transformer — ε-prediction on the DDPM linear schedule (β 0.0001–0.02, T = 1000) with learned variance (2C outputs,
the first C are ε̂) — converted to a flow teacher by its `Parametrisation` as PixArt-α (docs/algorithm.md §15).

The "prompt" of this family is an ImageNet class: a name of the pipeline's ``id2label`` (its ``pipe.labels``, every
comma-separated synonym; e.g. "golden retriever") or a class id as a decimal string ("207"); the empty prompt is the
null class (index ``num_embeds_ada_norm``, 1000), the unconditional input of classifier-free guidance — so the
negative prompt "" of the text-to-image machinery is DiT's CFG null class. Conditions are ``class_labels`` (B,)
long tensors (cached per prompt as a (1,) tensor by ``piflow encode-prompts``).

Latents go in as they are (the model patchifies and unpatchifies itself, square images only); the final layer is
proj_out_2(LayerNorm(x)·(1 + scale) + shift) with (shift, scale) = proj_out_1(SiLU(c)), c the timestep + class
embedding of block 0's ``norm1.emb`` (the student trains its own proj_out_1). Every block has its own
timestep/class embedder; their class-label dropout (10 %, active in train mode) is switched off for teachers and
students (`prepare_network`): distillation must never see a randomly dropped class.

diffusers' `DiTPipeline` (0.42) guides all latent channels (ε only; the variance channels are not guided) against
class 1000; piflow's CFG teacher is the same. The stock pipeline samples at the transformer's sample_size only.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from piflow.errors import DataError
from piflow.integrations.diffusers.families import base, calls
from piflow.integrations.diffusers.families.base import Architecture, Family, Parametrisation

# LoRA: the blocks' feed-forwards (ff.net.0.proj, ff.net.2) and every block's timestep-embedder MLP
# (norm1.emb.timestep_embedder.linear_1/2), never attention (§6.6). The class embedder is a lookup table (no MLP):
# not adapted.
DIT_LORA_TARGETS = (r".*(ff\.net\.0\.proj|ff\.net\.2|timestep_embedder\.linear_1|timestep_embedder\.linear_2)$")
# the scheduler config of facebook/DiT-XL-2-256: DDIM on the DDPM linear schedule, ε-prediction; only the schedule
# keys and prediction_type matter for the teacher. diffusers' scripts/convert_dit_to_diffusers.py builds the
# published pipeline's scheduler with num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon"
# and the default β range 0.0001–0.02, which are these keys
DIT_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "prediction_type": "epsilon", "clip_sample": False, "set_alpha_to_one": True,
    "steps_offset": 0}
# ten ImageNet classes of the tiny pipeline (ids and names as in ImageNet's id2label)
TINY_ID2LABEL = {1: "goldfish, Carassius auratus", 33: "loggerhead, loggerhead turtle, Caretta caretta",
                 88: "macaw", 207: "golden retriever", 279: "Arctic fox, white fox, Alopex lagopus", 360: "otter",
                 387: "lesser panda, red panda, panda, bear cat, cat bear, Ailurus fulgens", 417: "balloon",
                 974: "geyser", 980: "volcano"}


def prepare_network(transformer: nn.Module) -> None:
    """Switch off the class-label dropout of every `LabelEmbedding` (train mode would replace labels by the null
    class at random); the embedding table, the null class and eval-mode outputs are unchanged."""
    for module in transformer.modules():
        if type(module).__name__ == "LabelEmbedding":
            module.dropout_prob = 0.0


def model_inputs(x_t: Tensor, t: Tensor, cond: dict) -> dict:
    """x_t (B, C, H, W) square, the timestep t (B,) (from the `Parametrisation`), cond → `DiTTransformer2DModel`
    forward kwargs."""
    cond = base.check_cond(cond, ("class_labels",), "DiT")
    if x_t.shape[-1] != x_t.shape[-2]:
        raise ValueError(f"DiT samples square latents only, got {x_t.shape[-2]}×{x_t.shape[-1]}")
    labels = cond["class_labels"].to(device=x_t.device, dtype=torch.long).reshape(-1)
    return {"hidden_states": x_t, "timestep": t.reshape(-1), "class_labels": labels}


PARAMETRISATION = Parametrisation(DIT_SCHEDULER_CONFIG,
                                  out_channels=lambda transformer: int(transformer.config.in_channels), name="DiT")
ARCHITECTURE = Architecture(
    "dit", model_inputs, base.unpatchify_pqc, "pc", False, lambda transformer: DIT_LORA_TARGETS,
    packs_outside=False, base_class="DiTTransformer2DModel", final_norm="proj_out_1", projection="proj_out_2",
    temb_module="transformer_blocks.0.norm1.emb", read_temb=lambda args, kwargs, output: output,
    cond_dim=lambda transformer: int(transformer.inner_dim), alias="DiT", parametrisation=PARAMETRISATION,
    prepare_network=prepare_network)


def class_id(pipe, prompt: str) -> int:
    """The class index of one prompt: "" → the null class; a decimal id; a name of ``pipe.labels`` (exact, then
    case-insensitive). Anything else is a one-line `DataError` (a ValueError)."""
    num_classes = int(pipe.transformer.config.num_embeds_ada_norm)
    text = str(prompt).strip()
    if not text:
        return num_classes
    if text.isdigit():
        if int(text) >= num_classes:
            raise DataError(f"DiT: class id {text} is out of range (0–{num_classes - 1})")
        return int(text)
    labels = getattr(pipe, "labels", None) or {}
    if text in labels:
        return int(labels[text])
    folded = {name.lower(): index for name, index in labels.items()}
    if text.lower() in folded:
        return int(folded[text.lower()])
    examples = ", ".join(repr(name) for name in list(labels)[:3])
    raise DataError(f"DiT: unknown ImageNet class {text[:60]!r}: give a class id 0–{num_classes - 1} or a name of the "
                    f"pipeline's id2label ({len(labels)} names in pipe.labels{', e.g. ' + examples if examples else ''})")


def encode(pipe, prompts: list[str], max_sequence_length: int, references=None) -> list[dict]:
    """Per prompt: its class index as a (1,) long tensor (`class_id`)."""
    return [{"class_labels": torch.tensor([class_id(pipe, prompt)], dtype=torch.long)} for prompt in prompts]


def collate(items, device=None, dtype=None) -> dict:
    """Class labels (B,) long (never cast to the model dtype)."""
    labels = torch.cat([item["class_labels"].reshape(-1)[:1] for item in items]).long()
    return {"class_labels": labels.to(device)}


def tiny(latent_channels: int, seed: int) -> dict:
    """DiTPipeline components: a 2-layer DiTTransformer2DModel (2 heads × 8, patch 2, sample_size 8) with learned
    variance (2C outputs) and 1000 classes (+ the null class 1000: the stock pipeline's CFG index is fixed), an
    AutoencoderKL, the published DDIM scheduler config and an id2label of ten ImageNet classes."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    from piflow.integrations.diffusers import tiny as t

    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=latent_channels,
                                        out_channels=2 * latent_channels, num_layers=2, norm_num_groups=4,
                                        sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():       # diffusers zero-initialises the adaLN modulations: random ones condition the blocks
        for name, parameter in transformer.named_parameters():
            if "norm1.linear" in name or "proj_out_1" in name:
                parameter.normal_(0, 0.05)
    return dict(transformer=t.randomise_output_layer(transformer, ARCHITECTURE),
                vae=t.autoencoder_kl(latent_channels, seed + 1),
                scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG), id2label=dict(TINY_ID2LABEL))


def vae_factor(pipe) -> int:
    return 2 ** (len(pipe.vae.config.block_out_channels) - 1)


def prepare(pipe, call: dict) -> tuple[Tensor, dict, int]:
    prompt, labels = call["prompt"], call["class_labels"]
    if call["prompt_embeds"] is not None:
        raise ValueError("prompt_embeds: DiT is class-conditional; give prompt (class names or ids) or class_labels")
    if (prompt is None) == (labels is None):
        raise ValueError("give either prompt (ImageNet class names or ids, as strings) or class_labels (ints)")
    if labels is not None:
        ids = [int(v) for v in (labels.reshape(-1).tolist() if torch.is_tensor(labels) else
                                ([labels] if isinstance(labels, int) else labels))]
        ids = [class_id(pipe, str(v)) for v in ids]          # range-checked
    else:
        ids = [class_id(pipe, p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
    factor, patch = vae_factor(pipe), int(pipe.transformer.config.patch_size)
    default = int(pipe.transformer.config.sample_size) * factor
    height, width = int(call["height"] or default), int(call["width"] or default)
    if height != width:
        raise ValueError(f"DiT samples square images only, got {height}×{width}")
    calls.check_multiple(pipe, height, width, factor * patch)
    device = pipe._execution_device
    class_labels = torch.tensor(ids, device=device).repeat_interleave(int(call["num_images_per_prompt"]))
    side = height // factor
    noise = calls.noise((len(class_labels), pipe.transformer.config.in_channels, side, side), call["latents"],
                        call["generator"], device)
    return noise, {"class_labels": class_labels}, (side // patch) ** 2


def decode(pipe, x: Tensor, output_type: str):
    """Latents → images as the stock pipeline: x / scaling_factor decoded, (s/2 + 0.5) clamped to [0, 1]; "pt"
    (B, 3, H, W) tensors, "np" (B, H, W, 3) arrays, "pil" images."""
    samples = pipe.vae.decode((x / pipe.vae.config.scaling_factor).to(pipe.vae.dtype)).sample
    samples = (samples / 2 + 0.5).clamp(0, 1)
    if output_type == "pt":
        return samples
    samples = samples.cpu().permute(0, 2, 3, 1).float().numpy()
    return pipe.numpy_to_pil(samples) if output_type == "pil" else samples


PIPELINE = calls.PipelineHooks(
    positional=(("prompt", None),), prepare=prepare, decode=decode,
    output="diffusers.pipelines.pipeline_utils.ImagePipelineOutput",
    params={"class_labels": None, "num_images_per_prompt": 1},
    unused={"guidance_scale": None},
    doc="Generate class-conditional images: `prompt` — ImageNet class names of the pipeline's id2label "
        "(pipe.labels) or ids as strings (\"207\"; \"\" is the unconditional null class) — or `class_labels` "
        "(ints, as the stock pipeline); `latents` (optional) is the noise (B·n, C, H/8, W/8) at σ = 1; square "
        "images only (default: the model's sample size). `guidance_scale` is accepted and unused (guidance is "
        "distilled in).")

FAMILIES = (Family("dit", "dit", "DiTTransformer2DModel", "DiTPipeline", "PiDiTPipeline", encode, collate,
                   ("class_labels",), PIPELINE, tiny, guidance_scale=4.0, latent_packing="inside"),)
