"""The teachers that ship inside piflow (`src/piflow/assets/teachers/`), by the names a config gives them:
``teacher=digits-bundled`` in `piflow distill` reads the bundled digits DiT, ``teacher=mnist-bundled`` and
``teacher=fashion-mnist-bundled`` the MNIST and Fashion-MNIST U-Nets, wherever piflow is installed."""
from __future__ import annotations

from pathlib import Path

__all__ = ["BUNDLED_TEACHERS", "TEACHER_ASSETS", "teacher_source"]

TEACHER_ASSETS = Path(__file__).resolve().parent / "assets" / "teachers"

# name → folder under TEACHER_ASSETS (an ordinary `piflow train-teacher` run directory)
BUNDLED_TEACHERS = {"digits-bundled": "digits_dit", "mnist-bundled": "mnist_unet",
                    "fashion-mnist-bundled": "fashion_mnist_unet"}


def teacher_source(source: str) -> str:
    """The run directory a ``teacher`` value names: a bundled teacher's folder for a name of `BUNDLED_TEACHERS`,
    else the value itself."""
    return str(TEACHER_ASSETS / BUNDLED_TEACHERS[source]) if source in BUNDLED_TEACHERS else source
