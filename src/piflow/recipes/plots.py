"""Matplotlib figures for runs (Agg backend, PNG files)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(history: Sequence[dict], path: Path, title: str = "training loss") -> None:
    plt = pyplot()
    iters = np.array([h["iter"] for h in history])
    losses = np.array([h["loss"] for h in history])
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(iters, losses, lw=0.6, alpha=0.4, label="loss")
    if len(losses) >= 20:
        window = max(len(losses) // 50, 5)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(iters[window - 1:], smooth, lw=1.5, label=f"moving avg ({window})")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_sample_panels(panels: Sequence[tuple[str, np.ndarray]], path: Path, limit: float = 5.0,
                       bins: int = 90) -> None:
    """One 2-D histogram per (title, points (N, 2)) panel, side by side."""
    import textwrap

    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels), 3.4), squeeze=False)
    for ax, (title, points) in zip(axes[0], panels):
        ax.hist2d(points[:, 0], points[:, 1], bins=bins, range=[[-limit, limit], [-limit, limit]], cmap="magma")
        ax.set_title("\n".join(textwrap.wrap(title, 28)), fontsize=9)   # wrapped: long titles are never clipped
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_trajectories(teacher_paths: np.ndarray, student_paths: np.ndarray, path: Path,
                      step_points: Optional[np.ndarray] = None, limit: float = 5.0,
                      background: Optional[np.ndarray] = None) -> None:
    """Teacher ODE paths vs policy rollouts, both (T, N, 2); `step_points` (nfe+1, N, 2) marks network calls."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.2))
    if background is not None:
        ax.scatter(background[:, 0], background[:, 1], s=1, c="0.85")
    for i in range(teacher_paths.shape[1]):
        ax.plot(teacher_paths[:, i, 0], teacher_paths[:, i, 1], c="tab:blue", lw=1.2,
                label="teacher ODE" if i == 0 else None)
        ax.plot(student_paths[:, i, 0], student_paths[:, i, 1], c="tab:red", lw=1.0, ls="--",
                label="student policy rollout" if i == 0 else None)
    if step_points is not None:
        ax.scatter(step_points[:, :, 0].ravel(), step_points[:, :, 1].ravel(), c="k", s=10, zorder=3,
                   label="network evaluations")
    ax.set_xlim(-limit, limit)
    ax.set_ylim(-limit, limit)
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_metric_vs_nfe(series: dict[str, dict[int, float]], path: Path, ylabel: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for label, values in series.items():
        nfes = sorted(values)
        ax.plot(nfes, [values[n] for n in nfes], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("NFE")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def image_canvas(images, ncol: int) -> np.ndarray:
    """(N, C, H, W) images in [-1, 1] → one (rows·(H+1)+1, ncol·(W+1)+1, C) array in [0, 1] with 1-pixel gaps."""
    images = images.detach().float().clamp(-1, 1).add(1).div(2).cpu()
    if images.shape[1] not in (1, 3):
        images = images[:, :1]                        # other channel counts (latents): channel 0
    num, channels, height, width = images.shape
    ncol = max(min(ncol, num), 1)
    nrows = (num + ncol - 1) // ncol
    canvas = np.ones((nrows * (height + 1) + 1, ncol * (width + 1) + 1, channels), dtype=np.float32)
    for i in range(num):
        r, c = divmod(i, ncol)
        canvas[1 + r * (height + 1): 1 + r * (height + 1) + height,
               1 + c * (width + 1): 1 + c * (width + 1) + width] = images[i].permute(1, 2, 0).numpy()
    return canvas


def plot_image_rows(rows: Sequence[tuple[str, "object"]], path: Path, ncol: int = 16,
                    title: Optional[str] = None) -> None:
    """One labelled block per (label, images (N, C, H, W) in [-1, 1]) — e.g. "teacher Euler, 32 NFE" over
    "π-Flow student, 4 NFE" — each wrapped at `ncol` images per line; C = 1 or 3 (otherwise channel 0 is shown)."""
    plt = pyplot()
    canvases = [image_canvas(images, ncol) for _, images in rows]
    width = max(c.shape[1] for c in canvases)
    scale = min(max(6.0 / width, 0.02), 0.25)                   # inches per pixel: readable, not huge
    heights = [c.shape[0] for c in canvases]
    title_inches = 0.35 if title else 0.0
    fig_height = sum(heights) * scale + 0.35 * len(rows) + 0.4 + title_inches
    fig, axes = plt.subplots(len(rows), 1, squeeze=False, gridspec_kw={"height_ratios": heights},
                             figsize=(width * scale + 1.6, fig_height))
    for ax, (label, _), canvas in zip(axes[:, 0], rows, canvases):
        gray = canvas.shape[2] == 1
        ax.imshow(canvas[..., 0] if gray else canvas, cmap="gray" if gray else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(label, fontsize=9, loc="left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - title_inches / fig_height))   # the title keeps its own band
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
