"""Figures: labelled image rows and 2-D panels whose titles are never clipped."""
import numpy as np
import pytest
import torch

from piflow.recipes import plots


@pytest.fixture
def captured(monkeypatch):
    """The figures the plotting functions save (their artists inspected instead of the pixels)."""
    import matplotlib.figure

    figures = []
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, path, *args, **kwargs):
        figures.append((self, kwargs))
        return real_savefig(self, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    return figures


def test_image_rows_are_labelled(tmp_path, captured):
    rows = [("teacher Euler, 32 NFE", torch.zeros(20, 1, 8, 8)), ("GM student, 4 NFE", torch.ones(5, 3, 8, 8))]
    plots.plot_image_rows(rows, tmp_path / "rows.png", ncol=16, title="same noise per column")
    figure, kwargs = captured[-1]
    axes = figure.get_axes()
    assert [ax.get_title(loc="left") for ax in axes] == ["teacher Euler, 32 NFE", "GM student, 4 NFE"]
    assert figure._suptitle.get_text() == "same noise per column"
    first = axes[0].get_images()[0].get_array()
    assert first.shape == (2 * 9 + 1, 16 * 9 + 1)        # 20 images wrapped at 16 per line, 1-pixel gaps
    assert kwargs.get("bbox_inches") == "tight" and (tmp_path / "rows.png").stat().st_size > 0


def test_sample_panel_titles_are_wrapped_not_clipped(tmp_path, captured):
    title = "π-Flow student, 4 NFE (elastic; trained at 2 NFE with GM dropout)"
    plots.plot_sample_panels([(title, np.zeros((10, 2))), ("data", np.ones((10, 2)))], tmp_path / "p.png")
    figure, kwargs = captured[-1]
    shown = figure.get_axes()[0].get_title()
    assert shown.replace("\n", " ") == title and max(len(line) for line in shown.splitlines()) <= 28
    assert kwargs.get("bbox_inches") == "tight"
