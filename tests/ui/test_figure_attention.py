"""Attention results export the chosen layer's head as query x key with token labels on both axes (read back
from the PNG's cell colours and the SVG's texts); the result pane and the export dialog choose the same slice."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import xml.etree.ElementTree as ET

import numpy as np
import pytest

from desktop_app.engine.results import AnalysisResult
from desktop_app.ui import figure
from desktop_app.ui.colormaps import colormap

TOKENS = ["0: <bos>", "1: When", "2: ▁Mary", "3: ▁and", "4: ▁John", "5: ▁went"]


@pytest.fixture(autouse=True)
def _app(qapp):
    return qapp


def patterns():
    rng = np.random.default_rng(0)
    values = rng.random((2, 3, 6, 6))
    values = np.tril(values)
    values /= values.sum(axis=-1, keepdims=True)  # rows of a causal pattern sum to 1: their sum is useless
    return AnalysisResult("attn", "attention_patterns", {"prompt": "clean"}, ["layer", "head", "query", "key"],
                          values, {"layer": ["1", "3"], "head": ["0", "1", "2"], "query": TOKENS, "key": TOKENS})


def cell_colours(path, result, selection, width=900):
    """The colour at the centre of every heatmap cell of the PNG at `path` ([rows, cols, 3])."""
    from PySide6.QtGui import QColor, QImage

    fig = figure._build(result, width, None, 150, None, None, None, 1.0, None, selection)
    img = QImage(str(path))
    plot = fig.layout.plot
    rows, cols = fig.data.values.shape
    out = np.zeros((rows, cols, 3), int)
    for r in range(rows):
        for c in range(cols):
            x = plot.left() + (c + 0.5) * plot.width() / cols
            y = plot.top() + (r + 0.5) * plot.height() / rows
            col = QColor(img.pixel(int(x), int(y)))
            out[r, c] = (col.red(), col.green(), col.blue())
    return out, fig.layout.vlim


def test_png_shows_the_chosen_head_query_by_key(tmp_path):
    r = patterns()
    path = figure.render_figure(r, "png", tmp_path / "a.png", width_px=900, selection={"layer": "3", "head": "1"})
    got, vlim = cell_colours(path, r, {"layer": "3", "head": "1"})
    assert got.shape == (6, 6, 3)
    assert np.abs(got - colormap(r.values[1, 1], *vlim).astype(int)).max() <= 2
    assert np.abs(got - colormap(r.values[0, 0], *vlim).astype(int)).max() > 20  # another head looks different


def test_svg_labels_every_token_on_both_axes_and_names_the_slice(tmp_path):
    path = figure.render_figure(patterns(), "svg", tmp_path / "a.svg", width_px=1000, selection={"head": 2})
    texts = [("".join(el.itertext())).strip() for el in ET.parse(path).getroot().iter()
             if el.tag.endswith("text")]
    for token in TOKENS:
        assert texts.count(token) == 2, token  # a row label and a column label
    assert "query" in texts and "key" in texts
    subtitle = " ".join(texts)
    assert "layer 1 of 2" in subtitle and "head 2 of 3" in subtitle and "summed" not in subtitle


def test_result_pane_and_export_dialog_choose_the_same_slice(qtbot, tmp_path):
    from desktop_app.ui.export_dialog import ExportFigureDialog
    from desktop_app.ui.plots import ResultView

    r = patterns()
    view = ResultView()
    qtbot.addWidget(view)
    view.set_result(r)
    assert view.figure_selection() == {"layer": 0, "head": 0}
    view.findChild(object, "headSliceCombo").setCurrentIndex(2)
    np.testing.assert_allclose(view.image_data(), r.values[0, 2], atol=1e-6)
    assert view.figure_selection() == {"layer": 0, "head": 2}

    dialog = ExportFigureDialog(r, [], str(tmp_path / "a.png"), selection=view.figure_selection())
    qtbot.addWidget(dialog)
    assert dialog.findChild(object, "headFigureCombo").currentIndex() == 2
    dialog.findChild(object, "layerFigureCombo").setCurrentIndex(1)
    assert dialog.export_to(tmp_path / "d.png")
    got, vlim = cell_colours(tmp_path / "d.png", r, {"layer": 1, "head": 2}, width=1200)
    assert np.abs(got - colormap(r.values[1, 2], *vlim).astype(int)).max() <= 2

    rollout = AnalysisResult("roll", "attention_rollout", {}, ["layer", "query", "key"], r.values[:, 0],
                             {"layer": ["0", "1"], "query": TOKENS, "key": TOKENS})
    view.set_result(rollout)
    assert view.figure_selection() == {"layer": 1}  # the rollout through every layer
    np.testing.assert_allclose(view.image_data(), rollout.values[1], atol=1e-6)
    patching = AnalysisResult("resid", "activation_patching", {"metric": "logit_diff"}, ["layer", "position"],
                              np.zeros((2, 3)), {})
    view.set_result(patching)
    assert view.figure_selection() == {}
