"""Class-balanced sample sets for FID (the ADM protocol: 50 images of each of 1000 classes), at scale.

`sample_class_balanced` writes one PNG per sample (``{index:06d}.png``; sample `index` has class
``index // per_class`` and noise drawn from its own generator seeded by (seed, index), so the set does not depend on
the batch size or the number of processes), sharded round-robin over torchrun ranks and resumable (existing PNGs
are kept), then assembles the ADM ``.npz`` (``arr_0``: uint8 (N, H, W, 3); ``arr_1``: int64 labels) streamed to disk
without holding the set in memory. The student of a run is sampled with its NFE, or its (guided) teacher with
`teacher_steps` Euler steps — the same command gives both sides of the comparison.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from piflow.errors import ConfigError

__all__ = ["sample_class_balanced", "write_adm_npz", "sample_noise"]

_SEED_STRIDE = 1_000_003


def sample_noise(indices: list[int], shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(indices), *shape) standard normal noise; sample i's own generator is seeded by seed·1000003 + i."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed * _SEED_STRIDE + index))
                        for index in indices])


def _png_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def _save_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    from piflow.files import atomic_write

    atomic_write(path, lambda handle: Image.fromarray(image).save(handle, format="PNG"))


def write_adm_npz(folder: Path, total: int, per_class: int, out: Path) -> Path:
    """Stream the PNGs 0..total-1 of `folder` into the ADM ``.npz`` at `out` (atomically)."""
    from PIL import Image

    from piflow.files import atomic_write

    first = np.asarray(Image.open(_png_path(folder, 0)).convert("RGB"))
    shape = (total, *first.shape)

    def write(handle) -> None:
        with zipfile.ZipFile(handle, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open("arr_0.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, {"descr": "|u1", "fortran_order": False,
                                                              "shape": shape})
                for index in range(total):
                    image = np.asarray(Image.open(_png_path(folder, index)).convert("RGB"), dtype=np.uint8)
                    if image.shape != first.shape:
                        raise ConfigError(f"{_png_path(folder, index)} has shape {image.shape}, expected "
                                          f"{first.shape} (a PNG of another run in the folder?)")
                    member.write(np.ascontiguousarray(image).tobytes())
            with archive.open("arr_1.npy", "w") as member:
                np.lib.format.write_array(member, np.arange(total, dtype=np.int64) // per_class)

    atomic_write(out, write)
    return out


def sample_class_balanced(run_dir: Path, out: Path, per_class: int, *, nfe: Optional[int] = None,
                          teacher_steps: Optional[int] = None, batch_size: int = 64, seed: int = 0,
                          temperature=1.0, overrides=(), device: Optional[str] = None,
                          num_classes: Optional[int] = None) -> dict:
    """`per_class` samples of each class of an image run into the folder `out` (PNGs) and ``out.npz``.

    Latent runs are decoded by their ``vae``; pixel runs need 3-channel (or 1-channel) images in [−1, 1].
    `num_classes` limits the classes to the first N (a quick check); default all of the teacher's. Returns a
    summary (counts, paths, what was sampled)."""
    from piflow.progress import progress_bar
    from piflow.recipes.common import finished_distill_run, load_distilled
    from piflow.recipes.images import IMAGE_DISTILL_DEFAULTS, distill_setup, latent_decoder, student_label
    from piflow.sampling import euler_sample
    from piflow.train import distributed
    from piflow.integrations.diffusers.vae import to_uint8

    if nfe is not None and teacher_steps is not None:
        raise ConfigError("--nfe samples the student and --teacher-steps the teacher: give one of them")
    config, weights = finished_distill_run(run_dir, IMAGE_DISTILL_DEFAULTS, overrides)
    info = distributed.init_distributed()
    device = torch.device(device or (f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"))
    setup = distill_setup(config, load_data=False)
    classes = int(setup.teacher_model.config.num_classes)
    if num_classes is not None:
        if not 1 <= num_classes <= classes:
            raise ConfigError(f"--num-classes must lie in [1, {classes}], got {num_classes}")
        classes = num_classes
    total = per_class * classes
    out.mkdir(parents=True, exist_ok=True)
    setup.teacher_model.to(device)
    if teacher_steps is not None:
        what = f"teacher Euler, {teacher_steps} steps, guidance {config['guidance']['scale']}"
        sample = lambda noise, y, generator: euler_sample(setup.teacher, noise, teacher_steps, y)   # noqa: E731
    else:
        sampler = load_distilled(setup, weights)
        for value in vars(sampler).values():
            if isinstance(value, torch.nn.Module):
                value.to(device)
        nfe = sampler.nfe if nfe is None else nfe
        what = f"{student_label(config)} student, {nfe} NFE"
        sample = lambda noise, y, generator: sampler.sample(noise, nfe=nfe, cond=y, temperature=temperature,  # noqa
                                                            generator=generator)
    decode = latent_decoder(config, device)
    mine = [index for index in range(info.rank, total, info.world_size) if not _png_path(out, index).is_file()]
    bar = progress_bar(len(mine), f"sampling ({what})", enabled=info.is_main)
    generator = torch.Generator(device).manual_seed(seed * _SEED_STRIDE + 7919 * (info.rank + 1))
    for start in range(0, len(mine), batch_size):
        indices = mine[start:start + batch_size]
        noise = sample_noise(indices, setup.shape, seed).to(device)
        labels = torch.tensor(indices, device=device) // per_class
        with torch.no_grad():
            images = decode(sample(noise, labels, generator))
        if images.shape[1] not in (1, 3):
            raise ConfigError(f"samples have {images.shape[1]} channels: a latent run needs `vae` in its config "
                              f"(vae=<AutoencoderKL folder or Hub id> as an override) to write images")
        pixels = to_uint8(images.expand(-1, 3, -1, -1)).numpy()
        for index, image in zip(indices, pixels):
            _save_png(_png_path(out, index), image)
        bar.update(len(indices))
    bar.close()
    if info.enabled:
        torch.distributed.barrier()
    distributed.shutdown(wait_for_others=False)      # every rank's PNGs are written: no collective call follows
    npz = out.with_suffix(".npz")
    missing = [index for index in range(total) if not _png_path(out, index).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} of {total} samples are missing from {out} (first: {missing[0]}); run "
                          f"the command again to finish them")
    if info.is_main:
        write_adm_npz(out, total, per_class, npz)
    return {"what": what, "num_samples": total, "per_class": per_class, "num_classes": classes,
            "folder": str(out), "npz": str(npz), "sampled_now": len(mine), "rank": info.rank,
            "world_size": info.world_size}
