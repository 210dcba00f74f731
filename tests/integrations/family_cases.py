"""Per-family settings of the tiny pipelines in the family tests: image size, latent shape and the stock-pipeline
arguments that switch guidance off (the wrappers are compared with the stock pipelines without CFG)."""
from piflow.integrations.diffusers.families import get_family

SIZE = 32              # pixels (the tiny FLUX.2 and Wan VAEs compress 8×: 64 pixels there)
SIZES = {"flux2": 64, "flux2-klein": 64, "wan": 64}
VAE_FACTOR = {"flux2": 8, "flux2-klein": 8, "wan": 8}          # else 2
NUM_FRAMES = 5         # video families: 5 frames → 2 latent frames (4× temporal compression)
STOCK_GUIDANCE_OFF = {"flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 1.0}, "qwen": {"true_cfg_scale": 1.0},
                      "zimage": {"guidance_scale": 0.0}, "flux2": {"guidance_scale": 4.0},
                      "flux2-klein": {"guidance_scale": 1.0}, "wan": {"guidance_scale": 1.0}}


def image_size(family: str) -> int:
    return SIZES.get(family, SIZE)


def latent_shape(family: str, batch: int) -> tuple:
    """(B, C, H, W) — (B, C, T, H, W) for video — of the tiny pipelines' latents (4 latent channels)."""
    side = image_size(family) // VAE_FACTOR.get(family, 2)
    if get_family(family).video:
        return (batch, 4, (NUM_FRAMES - 1) // 4 + 1, side, side)
    return (batch, 4, side, side)


def size_arguments(family: str) -> dict:
    """height, width (and num_frames) of a pipeline call."""
    size = image_size(family)
    return dict(height=size, width=size, **({"num_frames": NUM_FRAMES} if get_family(family).video else {}))


def stock_arguments(family: str) -> dict:
    return dict(size_arguments(family), **STOCK_GUIDANCE_OFF[family])


def encode_arguments(family: str, count: int) -> dict:
    """Extra `encode_prompts` arguments (reference images of editing families)."""
    return {}


def pipe_arguments(family: str) -> dict:
    """Extra pipeline-call arguments (reference images of editing families)."""
    return {}
