"""The attribution graph view on the demo model's graph (shipped transcoders): what is drawn at a threshold is what
a numpy computation on the stored adjacency says; hover cards, pins written to the Neuronpedia JSON, PNG export."""
import json

import numpy as np
import pytest
from PySide6.QtWidgets import QLabel, QSlider

from desktop_app.demo_assets import resources_dir


@pytest.fixture(scope="module")
def demo_graph():
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model

    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    return drive(attribution_graph_job(lm, tokens, str(demo / "transcoders"), max_n_logits=5))


def _expected(ex, node_pct, edge_pct, pinned=()):
    """Independent: features sorted by influence until the cumulative sum reaches node_pct of the total."""
    kinds, infl, adj = ex["node_kind"], ex["node_influence"].astype(float), ex["adjacency"].astype(float)
    keep = kinds != "feature"
    keep |= np.isin(ex["node_ids"], list(pinned))
    f = np.where(kinds == "feature")[0]
    if node_pct >= 100:
        keep[f] = True
    else:
        s = np.clip(infl[f], 0, None)
        order = np.argsort(-s, kind="stable")
        total, acc = s.sum(), 0.0
        for j in order:
            if node_pct > 0 and acc < node_pct / 100 * total * (1 - 1e-12):
                keep[f[j]] = True
                acc += s[j]
    a = np.abs(adj)[np.ix_(keep, keep)]
    edges = int(((a > 0) & (a >= edge_pct / 100 * a.max())).sum())
    return int(keep.sum()), edges


def _view(qtbot, result):
    from desktop_app.ui.graph_view import GraphView

    view = GraphView()
    qtbot.addWidget(view)
    view.resize(1100, 650)
    view.show_result(result)
    return view


def test_drawn_nodes_and_edges_follow_the_sliders(qtbot, demo_graph):
    view = _view(qtbot, demo_graph)
    assert view.objectName() == "graphView"
    node_slider = view.findChild(QSlider, "nodeThresholdSlider")
    edge_slider = view.findChild(QSlider, "edgeThresholdSlider")
    ex = demo_graph.extras
    assert view.shown_counts() == (len(ex["node_ids"]), int((ex["adjacency"] != 0).sum()))
    seen = set()
    for node_pct, edge_pct in ((100, 0), (80, 0), (50, 5), (20, 20), (0, 50), (90, 1)):
        node_slider.setValue(node_pct)
        edge_slider.setValue(edge_pct)
        counts = view.shown_counts()
        assert counts == _expected(ex, node_pct, edge_pct), (node_pct, edge_pct)
        seen.add(counts)
    assert len(seen) >= 4  # the sliders do change what is shown


def test_hover_card_and_pins_reach_the_json(qtbot, demo_graph, tmp_path):
    from desktop_app.project.graph_json import write_graph_json

    view = _view(qtbot, demo_graph)
    ex = demo_graph.extras
    f = int(np.where(ex["node_kind"] == "feature")[0][0])
    view.hover_node(f)
    card = view.findChild(QLabel, "graphNodeCard").text()
    assert str(ex["node_ids"][f]) in card and f"feature {int(ex['node_feature'][f])}" in card
    assert "No feature cards yet" in card and f"{float(ex['node_activation'][f]):.4g}" in card
    node_id = str(ex["node_ids"][f])
    view.findChild(QSlider, "nodeThresholdSlider").setValue(0)
    view.toggle_pin(node_id)
    assert demo_graph.params["pinned_ids"] == [node_id]
    assert view.shown_counts()[0] == _expected(ex, 0, 0, pinned=[node_id])[0]  # a pinned node stays shown
    assert len(view.pin_item.data) == 1
    path = write_graph_json(demo_graph, tmp_path / "g.json")
    assert json.loads(path.read_text())["qParams"]["pinnedIds"] == [node_id]
    view.toggle_pin(node_id)
    assert demo_graph.params["pinned_ids"] == []


def test_png_export_and_grab(qtbot, demo_graph, tmp_path):
    view = _view(qtbot, demo_graph)
    view.export(str(tmp_path / "graph.png"))
    assert (tmp_path / "graph.png").stat().st_size > 5000
    assert view.grab().save(str(tmp_path / "grab.png"))


def test_window_shows_the_graph_in_the_detail_dock(qtbot, window, demo_graph):
    from desktop_app.project import kinds
    from desktop_app.ui.kind_views import show_detail

    show_detail(window, demo_graph, kinds.get("attribution_graph"))
    view = window.detail_views["graph"]
    assert view.objectName() == "graphView" and view.result is demo_graph
    assert window.docks["detailDock"].isVisible()


def test_legend_title_and_logit_token_labels(qtbot, demo_graph, tmp_path):
    from desktop_app.engine.loading import load_model
    from desktop_app.project.graph_json import read_graph_json, write_graph_json

    view = _view(qtbot, demo_graph)
    legend = view.findChild(QLabel, "graphLegend").text()
    for word in ("embedding", "feature", "error", "logit", "positive edge", "negative edge"):
        assert word in legend
    title = view.findChild(QLabel, "graphTitle").text()
    assert "model" in title and "Mary" in title  # the demo model's folder name and the prompt
    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    ex = demo_graph.extras
    logits = np.where(ex["node_kind"] == "logit")[0]
    expected = lm.tokens_of_ids(ex["node_feature"][logits]).display
    shown = sorted(item.toPlainText() for item in view.logit_labels)
    assert shown == sorted(expected) and len(shown) == len(logits)
    back = read_graph_json(write_graph_json(demo_graph, tmp_path / "g.json"), int(ex["model_n_layers"]),
                           int(ex["model_vocab_size"]))
    assert list(back.extras["node_token_text"][logits]) == list(expected)
    assert view.grab().save(str(tmp_path / "view.png"))
