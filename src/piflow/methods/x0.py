"""x0-regression (the "shortcut" baseline): a one-node DX student — one constant x̂0 per step, DDIM-like steps —
whose x̂0 at the grid points of the teacher's own ODE is regressed onto the ODE's endpoint from the same noise.
Same backbone, initialisation, data and step budget as π-ID; only the loss differs."""
from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from piflow.config import ConfigError
from piflow.methods.piid import PiID
from piflow.sampling import euler_trajectory
from piflow.schedule import segment_grid
from piflow.train import distributed

X0_BANK_STEPS = 32          # the teacher's Euler steps from noise to its ODE endpoint
BANK_CHUNK = 512            # trajectories run (and kept, while the bank is computed) at a time


def x0_grid(nfe: int, final_step_size_scale: float, shift: float) -> list[int]:
    """The student's grid points in units of 1/32 (a `ConfigError` unless shift = 1 and they are whole)."""
    raw = segment_grid(nfe, final_step_size_scale)
    if shift != 1.0 or any(abs(t * X0_BANK_STEPS - round(t * X0_BANK_STEPS)) > 1e-6 for t in raw):
        raise ConfigError("the x0-regression method needs distill.shift=1 and a segment grid on multiples of 1/32 "
                          "(distill.nfe and distill.final_step_size_scale)")
    return [round(t * X0_BANK_STEPS) for t in raw]


def teacher_ode_bank(teacher, noise: Tensor, cond, indices: list[int], cache_key: Optional[bytes] = None,
                     progress: bool = False) -> tuple[Tensor, Tensor]:
    """(states at the grid indices (G, N, *shape), ODE endpoints (N, *shape)) of the teacher's 32-step Euler
    trajectories from `noise` (N, *shape), run `BANK_CHUNK` trajectories at a time.

    With a `cache_key` (the teacher's identity and every input) the bank is read from and written to
    ``cache_dir()/x0_bank`` (safetensors; a damaged entry is recomputed). One entry serves every grid of the same
    trajectories (the 1- and 4-NFE students): it keeps the states at every index asked for so far. While the bank is
    computed, each finished chunk is kept in ``<entry>.parts/``, so a run killed part-way (the bank is computed
    before the training loop and its SIGTERM checkpointing) loses at most one chunk: the same command resumes."""
    from piflow.files import cache_dir

    path, held = None, []
    if cache_key is not None:
        digest = hashlib.sha256(cache_key)
        digest.update(repr((X0_BANK_STEPS, tuple(noise.shape))).encode())
        digest.update(noise.numpy().tobytes())
        if torch.is_tensor(cond):
            digest.update(cond.numpy().tobytes())
        path = cache_dir() / "x0_bank" / f"{digest.hexdigest()[:32]}.safetensors"
        found, held = _read_bank(path, indices, noise.device)
        if found is not None:
            return found
    union = sorted(set(held) | set(indices))       # a recomputed entry keeps the grids of the old one too
    parts = None if path is None else path.with_suffix(".parts")
    states, endpoints = _bank_chunks(teacher, noise, cond, union, parts, progress)
    if path is not None:
        _try_save(path, states, union, endpoints)
        shutil.rmtree(parts, ignore_errors=True)
    return states[torch.tensor([union.index(i) for i in indices])], endpoints


def _bank_chunks(teacher, noise: Tensor, cond, union: list[int], parts: Optional[Path],
                 progress: bool) -> tuple[Tensor, Tensor]:
    """Every chunk of the bank: (states at the `union` indices (G, N, *shape), endpoints (N, *shape)), each chunk
    read from `parts` when an earlier run finished it (with every index of `union`), else computed and kept there."""
    from piflow.progress import progress_bar

    states, endpoints = [], []
    bar = progress_bar(len(noise), "x0 teacher bank (trajectories)", enabled=progress)
    for start in range(0, len(noise), BANK_CHUNK):
        stop = min(start + BANK_CHUNK, len(noise))
        part = None if parts is None else parts / f"{start}-{stop}.safetensors"
        chunk = None if part is None else _read_bank(part, union, noise.device)[0]
        if chunk is None:
            part_cond = cond[start:stop] if torch.is_tensor(cond) else cond
            trajectories = euler_trajectory(teacher, noise[start:stop], X0_BANK_STEPS, part_cond)
            chunk = (trajectories[torch.tensor(union)].to(noise.device).contiguous(),    # where the noise is,
                     trajectories[-1].to(noise.device).contiguous())                    # as are read chunks
            if part is not None:
                _try_save(part, chunk[0], union, chunk[1])
        states.append(chunk[0])
        endpoints.append(chunk[1])
        bar.update(stop - start)
    bar.close()
    return torch.cat(states, dim=1), torch.cat(endpoints)


def _read_bank(path: Path, indices: list[int], device) -> tuple[Optional[tuple[Tensor, Tensor]], list[int]]:
    """A bank file (the whole entry or one chunk of it): ((states at `indices`, endpoints), or None when the file
    lacks one of them, is missing or damaged (or removed by another rank meanwhile); the indices it holds)."""
    from piflow.files import load_safetensors

    if not path.is_file():
        return None, []
    try:
        stored = load_safetensors(path, "x0-baseline cache", device=str(device))
        held = stored["indices"].tolist()
        if not set(indices) <= set(held):
            return None, held
        return (stored["states"][[held.index(i) for i in indices]], stored["endpoints"]), held
    except (ValueError, KeyError, IndexError, RuntimeError, OSError):      # a file without its states/endpoints too
        return None, []


def _try_save(path: Path, states: Tensor, indices: list[int], endpoints: Tensor) -> None:
    """Write a bank file (states at `indices`, endpoints) atomically; an unwritable cache only costs time."""
    from piflow.files import save_safetensors

    try:
        save_safetensors(path, {"states": states, "indices": torch.tensor(indices), "endpoints": endpoints})
    except OSError as error:
        print(f"piflow: warning: could not cache the x0-baseline bank ({error})", file=sys.stderr)


class X0Regression(PiID):
    """x0-regression: `distill.x0_bank_size` teacher trajectories from seeded noise (seed ``train.seed`` + 99),
    each batch a random (trajectory, grid point) pair per sample; loss ½·mean ‖x̂0 − x0_teacher‖²."""

    name = "x0"
    title = "x0-regression"
    paper = "the x0 (shortcut) baseline of the π-Flow paper's ablations"
    loss_title = "x0-regression loss"

    def __init__(self, setup):
        super().__init__(setup)
        self.grid = x0_grid(self.piid.nfe, self.piid.final_step_size_scale, self.piid.shift)

    def policy_override(self) -> dict:
        return {"policy": "dx"}

    def student(self) -> nn.Module:
        return self.setup.policy_student("dx", 1)

    def bank(self) -> tuple[Tensor, Any, Tensor, Tensor]:
        """The run's teacher bank: (noise (N, *shape), conditions of the N trajectories, states at the student's
        grid points (G, N, *shape), in the order of `grid`, ODE endpoints (N, *shape)); N =
        ``distill.x0_bank_size``, the noise and conditions drawn with seed ``train.seed`` + 99, the bank read from
        the cache when an earlier run of the same teacher and settings computed it."""
        setup = self.setup
        indices = [X0_BANK_STEPS - g for g in self.grid]                # state index of each grid point σ = g/32
        bank_size = int(self.config["distill"]["x0_bank_size"])
        gen = torch.Generator().manual_seed(setup.seed + 99)
        noise = torch.randn(bank_size, *setup.shape, generator=gen)
        labels = setup.draw_cond(gen, bank_size)
        key = None if setup.teacher_identity is None else setup.teacher_identity() + repr(
            self.config.get("guidance")).encode()
        states, endpoints = teacher_ode_bank(setup.teacher, noise, labels, indices, key, progress=self.config[
            "train"].get("progress") is True and distributed.current().is_main)
        return noise, labels, states, endpoints

    def loss_fn(self, student: nn.Module):
        setup = self.setup
        pf = self.piflow(student)
        _, labels, states, endpoints = self.bank()
        sigmas = torch.tensor([g / X0_BANK_STEPS for g in self.grid])
        batch = setup.batch_size

        def loss_fn(iteration: int, generator: torch.Generator, backward) -> Tensor:
            rows = torch.randint(len(endpoints), (batch,), generator=generator)
            point = torch.randint(len(sigmas), (batch,), generator=generator)
            x, sigma = states[point, rows], sigmas[point]
            cond = labels[rows] if torch.is_tensor(labels) else labels
            x0_pred = pf.policy(x, sigma, cond).x0(x, sigma)
            return 0.5 * (x0_pred - endpoints[rows]).square().flatten(1).mean(1).mean()

        return loss_fn
