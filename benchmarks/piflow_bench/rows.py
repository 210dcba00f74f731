"""Scored rows (one strict-JSON file each, never recomputed), their mean ± std over seeds and markdown tables."""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

from torch import Tensor

from piflow.files import load_safetensors, read_json, save_safetensors, write_json

SHOWN_IN_LOG = ("fd_teacher", "fd_teacher_b", "class_vendi", "recall", "hf_ratio", "mode_mass_error",
                "energy_distance")


def slug(text: str) -> str:
    """A file-name form of a row label: runs of other characters become one underscore, lower case."""
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower()


class RowStore:
    """Scored rows, one strict-JSON file each under ``run_dir/rows`` (written atomically): a row that exists is
    never recomputed."""

    def __init__(self, run_dir: Path, log: Callable[[str], None]):
        self.directory = run_dir / "rows"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log

    def path(self, method: str, nfe: int, seed: Optional[int]) -> Path:
        return self.directory / f"{slug(method)}_nfe{nfe}{'' if seed is None else f'_seed{seed}'}.json"

    def get(self, method: str, nfe: int, seed: Optional[int], compute: Callable[[], dict], **info) -> dict:
        path = self.path(method, nfe, seed)
        if path.is_file():
            return read_json(path)
        row = dict(compute(), method=method, nfe=nfe, seed=seed, **info)
        write_json(path, row)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float) and k in SHOWN_IN_LOG)
        self.log(f"[claims] {method} @ {nfe} NFE" + ("" if seed is None else f" seed {seed}") + f": {shown}")
        return row

    def read(self, method: str, nfe: int, seed: Optional[int]) -> Optional[dict]:
        """The stored row, or None."""
        path = self.path(method, nfe, seed)
        return read_json(path) if path.is_file() else None

    def figure_path(self, method: str, nfe: int, seed: Optional[int]) -> Path:
        return self.path(method, nfe, seed).with_suffix(".figure.safetensors")

    def figure(self, method: str, nfe: int, seed: Optional[int],
               compute: Optional[Callable[[], Tensor]]) -> Optional[Tensor]:
        """The row's samples kept for the sample figure (stored beside the row, so a run whose students are gone,
        e.g. one continued from published rows, still draws them); computed when missing and `compute` is given,
        else None."""
        path = self.figure_path(method, nfe, seed)
        if path.is_file():
            return load_safetensors(path, "figure samples")["samples"]
        if compute is None:
            return None
        samples = compute()
        save_safetensors(path, {"samples": samples})
        return samples

    def all(self) -> list[dict]:
        return [read_json(path) for path in sorted(self.directory.glob("*.json"))]

    def import_rows(self, source: Path, rtol: float = 1e-3, atol: float = 1e-5) -> int:
        """Adds the rows of another run's ``rows`` directory that this store lacks (with their figure samples),
        after checking that the two runs score alike: every reference / teacher row both hold must agree in every
        number within `rtol`/`atol` (same noise, teacher samples and feature classifiers, up to round-off); a
        disagreement, or no common reference row, is a one-line ValueError. Returns how many rows were added."""
        source = Path(source)
        theirs = [(path, read_json(path)) for path in sorted(source.glob("*.json"))]
        if not theirs:
            raise ValueError(f"rows_from: {source} holds no row files (*.json)")
        compared = 0
        for path, row in theirs:
            mine = self.read(row["method"], row["nfe"], row.get("seed"))
            if row.get("family") not in ("reference", "teacher") or mine is None:
                continue
            for key, value in row.items():
                other = mine.get(key)
                if (isinstance(value, float) and isinstance(other, (int, float))
                        and not math.isclose(value, other, rel_tol=rtol, abs_tol=atol)
                        and not (math.isnan(value) and math.isnan(other))):
                    raise ValueError(f"rows_from: {path.name} scores {key}={value:.6g} there and {other:.6g} here: "
                                     "the runs differ in noise, teacher or feature classifiers")
            compared += 1
        if compared == 0:
            raise ValueError(f"rows_from: {source} shares no reference or teacher row with this run, so its rows "
                             "cannot be checked against it")
        added = 0
        for path, row in theirs:
            if (self.directory / path.name).is_file():
                continue
            write_json(self.directory / path.name, row)
            figure = path.with_suffix(".figure.safetensors")
            if figure.is_file():
                save_safetensors(self.directory / figure.name, load_safetensors(figure, "figure samples"))
            added += 1
        self.log(f"[claims] {added} rows from {source} (the {compared} reference rows both hold agree)")
        return added


def summarise(rows: list[dict]) -> list[dict]:
    """Rows grouped by (method, nfe) in first-seen order: mean and std (over seeds, ddof = 1) of every number."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["nfe"]), []).append(row)
    summary = []
    for (method, nfe), members in groups.items():
        entry: dict[str, Any] = {"method": method, "nfe": nfe, "seeds": len(members),
                                 "family": members[0].get("family", "")}
        for key in members[0]:
            values = [m[key] for m in members if isinstance(m.get(key), (int, float)) and not isinstance(m[key], bool)]
            if key in ("nfe", "seed") or len(values) != len(members):
                continue
            if not all(math.isfinite(v) for v in values):
                entry[key] = float("nan")
                continue
            mean = sum(values) / len(values)
            entry[key] = mean
            if len(values) > 1:
                entry[f"{key}_std"] = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
        summary.append(entry)
    return summary


FAMILY_ORDER = {"reference": 0, "teacher": 1, "student": 2, "equal-compute": 3}


def ordered_summary(rows: list[dict]) -> list[dict]:
    """`summarise`d rows in table order: the reference, the teacher's samplers, the students, then the
    equal-compute rows, each by NFE."""
    return sorted(summarise(rows), key=lambda e: (FAMILY_ORDER.get(e["family"], 2), e["nfe"], e["method"]))


def find(summary: list[dict], method: str, nfe: int) -> Optional[dict]:
    return next((e for e in summary if e["method"] == method and e["nfe"] == nfe), None)


def _cell(entry: dict, key: str, fmt: str) -> str:
    value = entry.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    std = entry.get(f"{key}_std")
    return fmt.format(value) + (f" ± {fmt.format(std)}" if std is not None else "")


def format_markdown(summary: list[dict], columns) -> str:
    """A markdown table: method, NFE, seeds and one column per (key, title, format) of `columns`."""
    lines = ["| method | NFE | seeds | " + " | ".join(title for _, title, _ in columns) + " |",
             "|---|---:|---:|" + "---:|" * len(columns)]
    for entry in summary:
        lines.append(f"| {entry['method']} | {entry['nfe']} | {entry['seeds']} | "
                     + " | ".join(_cell(entry, key, fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines) + "\n"


def train_seconds(run_dir: Path) -> Optional[float]:
    """The ``train_seconds`` recorded in a training run's metrics.json (None before it finished)."""
    path = run_dir / "metrics.json"
    return read_json(path).get("train_seconds") if path.is_file() else None

