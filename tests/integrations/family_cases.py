"""Per-family settings of the tiny pipelines in the family tests: image size, latent shape and the stock-pipeline
arguments that switch guidance off (the wrappers are compared with the stock pipelines without CFG)."""
from piflow.integrations.diffusers.families import get_family

SIZE = 32              # pixels
STOCK_GUIDANCE_OFF = {"flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 1.0}, "qwen": {"true_cfg_scale": 1.0},
                      "zimage": {"guidance_scale": 0.0}}


def latent_shape(family: str, batch: int) -> tuple:
    """(B, C, H, W) of the tiny pipelines' latents at SIZE pixels (VAE factor 2, 4 latent channels)."""
    spec = get_family(family)
    spatial = (SIZE // 2, SIZE // 2)
    return (batch, 4, 1, *spatial) if spec.video else (batch, 4, *spatial)


def stock_arguments(family: str) -> dict:
    return dict(height=SIZE, width=SIZE, **STOCK_GUIDANCE_OFF[family])


def encode_arguments(family: str, count: int) -> dict:
    """Extra `encode_prompts` arguments (reference images of editing families)."""
    return {}
