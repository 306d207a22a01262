"""`interp-workbench export` of attention results: the figure is one head's query x key pattern (--layer /
--head), read back from the PNG's cells and compared with the project's own numbers."""
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from cli_helpers import experiment_dict, has_module, write_json

from desktop_app.cli import main
from desktop_app.project.iwb import load_project

pytestmark = pytest.mark.skipif(not (has_module("desktop_app.ui.figure") and has_module("PySide6")),
                                reason="figures need PySide6")


@pytest.fixture(scope="module")
def project(tmp_path_factory, ioi_gpt2_dir):
    root = tmp_path_factory.mktemp("cli_attention")
    exp = write_json(root / "attention.json", experiment_dict(ioi_gpt2_dir, [
        {"name": "attn", "kind": "attention_patterns", "prompt": "clean"},
        {"name": "roll", "kind": "attention_rollout", "prompt": "clean"}]))
    out = root / "attention.iwb"
    assert main(["run", str(exp), "--out", str(out), "--quiet"]) == 0
    return out


def _cells(png, result, selection):
    from PySide6.QtGui import QColor, QImage

    from desktop_app.ui import figure

    fig = figure._build(result, 900, None, 100, None, None, None, 1.0, None, selection)
    img, plot = QImage(str(png)), fig.layout.plot
    rows, cols = fig.data.values.shape
    got = np.array([[QColor(img.pixel(int(plot.left() + (c + .5) * plot.width() / cols),
                                      int(plot.top() + (r + .5) * plot.height() / rows))).getRgb()[:3]
                     for c in range(cols)] for r in range(rows)])
    return got, fig.layout.vlim


def test_png_of_a_chosen_head_is_its_query_by_key_pattern(project, tmp_path, qapp):
    from desktop_app.ui.colormaps import colormap

    png = tmp_path / "attn.png"
    assert main(["export", str(project), "--analysis", "attn", "--out", str(png), "--width", "900", "--dpi", "100",
                 "--layer", "1", "--head", "3"]) == 0
    result = load_project(project).entry("attn").result
    got, vlim = _cells(png, result, {"layer": "1", "head": "3"})
    n = result.values.shape[-1]
    assert got.shape == (n, n, 3)
    assert np.abs(got - colormap(result.values[1, 3], *vlim).astype(int)).max() <= 2
    assert len({tuple(c) for c in got.reshape(-1, 3)}) > n  # a pattern, not one colour


def test_svg_names_the_slice_and_labels_both_axes(project, tmp_path, qapp):
    svg = tmp_path / "roll.svg"
    assert main(["export", str(project), "--analysis", "roll", "--out", str(svg)]) == 0
    texts = [("".join(el.itertext())).strip() for el in ET.parse(svg).getroot().iter() if el.tag.endswith("text")]
    result = load_project(project).entry("roll").result
    n_layers = result.values.shape[0]
    assert any(f"layer {n_layers - 1} of {n_layers}" in t for t in texts)  # the rollout through every layer
    assert "query" in texts and "key" in texts
    for token in result.labels["key"]:
        assert texts.count(str(token)) == 2, token


def test_a_slice_that_is_not_there_or_a_data_format_is_refused(project, tmp_path, capsys):
    assert main(["export", str(project), "--analysis", "attn", "--out", str(tmp_path / "a.png"),
                 "--layer", "7"]) == 2
    assert "has no layer '7'; choose one of 0, 1" in capsys.readouterr().err
    assert main(["export", str(project), "--analysis", "attn", "--out", str(tmp_path / "a.csv"),
                 "--head", "0"]) == 2
    assert "--head choose what a figure shows" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "a.png") and not os.path.exists(tmp_path / "a.csv")
