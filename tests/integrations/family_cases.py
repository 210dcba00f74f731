"""Per-family settings of the tiny pipelines in the family tests: image size, latent shape, reference images of the
editing families and the stock-pipeline arguments that switch guidance off (the wrappers are compared with the
stock pipelines without CFG)."""
import numpy as np

from piflow.integrations.diffusers.families import get_family

SIZE = 32              # pixels (the tiny FLUX.2 and Wan VAEs compress 8×: 64 pixels there)
SIZES = {"flux2": 64, "flux2-klein": 64, "wan": 64, "qwen-edit": 64, "qwen-edit-plus": 64}
VAE_FACTOR = {"flux2": 8, "flux2-klein": 8, "wan": 8, "qwen-edit": 8, "qwen-edit-plus": 8}     # else 2
REFERENCE_AREA = 32 * 32     # tiny.small_reference_area: Qwen-Image-Edit references resized to ~32×32
NUM_FRAMES = 5         # video families: 5 frames → 2 latent frames (4× temporal compression)
STOCK_GUIDANCE_OFF = {"flux": {"guidance_scale": 3.5}, "sd3": {"guidance_scale": 1.0}, "qwen": {"true_cfg_scale": 1.0},
                      "zimage": {"guidance_scale": 0.0}, "flux2": {"guidance_scale": 4.0},
                      "flux2-klein": {"guidance_scale": 1.0}, "wan": {"guidance_scale": 1.0},
                      "qwen-edit": {"true_cfg_scale": 1.0}, "qwen-edit-plus": {"true_cfg_scale": 1.0},
                      "pixart": {"guidance_scale": 1.0, "use_resolution_binning": False},
                      "sd15": {"guidance_scale": 1.0}, "sdxl": {"guidance_scale": 1.0},
                      "flux-kontext": {"guidance_scale": 3.5, "max_area": 32 * 32},
                      "longcat": {"guidance_scale": 1.0, "enable_prompt_rewrite": False}}
LATENT_CHANNELS = {"longcat": 16}      # the stock LongCat pipeline always draws 16 channels; else the tiny 4


def image_size(family: str) -> int:
    return SIZES.get(family, SIZE)


def latent_shape(family: str, batch: int) -> tuple:
    """(B, C, H, W) — (B, C, T, H, W) for video — of the tiny pipelines' latents (4 latent channels; LongCat 16)."""
    side = image_size(family) // VAE_FACTOR.get(family, 2)
    channels = LATENT_CHANNELS.get(family, 4)
    if get_family(family).video:
        return (batch, channels, (NUM_FRAMES - 1) // 4 + 1, side, side)
    return (batch, channels, side, side)


def size_arguments(family: str) -> dict:
    """height, width (and num_frames) of a pipeline call."""
    size = image_size(family)
    return dict(height=size, width=size, **({"num_frames": NUM_FRAMES} if get_family(family).video else {}))


def stock_arguments(family: str) -> dict:
    return dict(size_arguments(family), **STOCK_GUIDANCE_OFF[family])


def reference_images(seed: int = 0, count: int = 1, scale: int = 1) -> list:
    """`count` random RGB PIL images (32×32 and 48×32 in turn, times `scale`: FLUX.2 wants ≥ 64 px) — the
    reference images of the editing tests."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    sizes = [(32 * scale, 32 * scale), (48 * scale, 32 * scale)]
    return [Image.fromarray(rng.integers(0, 256, (sizes[i % 2][1], sizes[i % 2][0], 3), dtype=np.uint8))
            for i in range(count)]


def references_per_prompt(family: str) -> list:
    """The reference images every test prompt is edited with (Edit: one, Edit-Plus: two)."""
    return reference_images(count=2 if family == "qwen-edit-plus" else 1)


def encode_arguments(family: str, count: int) -> dict:
    """Extra `encode_prompts` arguments (reference images of editing families)."""
    if get_family(family).references != "required":
        return {}
    return {"images": [references_per_prompt(family)] * count}


def pipe_arguments(family: str) -> dict:
    """Extra pipeline-call arguments (reference images of editing families, shared by the prompts)."""
    if get_family(family).references != "required":
        return {}
    return {"image": references_per_prompt(family)}


def stock_prompts(family: str, prompts: list) -> list:
    """The prompts a stock pipeline takes in one call (Edit-Plus refuses batches); a new list (Z-Image's pipeline
    rewrites its prompt list in place)."""
    return list(prompts[:1] if family == "qwen-edit-plus" else prompts)


def stock_pipe_arguments(family: str, prompts: list) -> dict:
    """Reference arguments of the stock pipelines (Edit wants one image per prompt in a batch)."""
    arguments = pipe_arguments(family)
    if family == "qwen-edit":
        arguments["image"] = arguments["image"] * len(prompts)
    return arguments
