"""The result pane of an attribution graph: the top nodes by |influence on the logits| as ranked horizontal bars
(logits left out), labelled by layer / feature / position token, coloured as in the graph view; hover gives the node
id and its card, a click shows and rings the node in the graph view; other kinds draw as before."""
import numpy as np
import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtGui import QFont, QFontMetricsF

from desktop_app.demo_assets import demo_corpus_path, demo_transcoders_dir
from desktop_app.engine.results import AnalysisResult
from desktop_app.ui.graph_ranking import AXIS_NAME, MIN_ROWS, TOP_N

def _view(qtbot, result):
    from desktop_app.ui.plots import ResultView

    view = ResultView()
    qtbot.addWidget(view)
    view.resize(900, 700)
    view.show()
    qtbot.waitExposed(view)
    view.set_result(result)
    qtbot.wait(50)
    return view


def _expected_top(ex):
    kinds = np.asarray(ex["node_kind"]).astype(str)
    infl = np.asarray(ex["node_influence"], dtype=float)
    idx = [i for i in range(len(kinds)) if kinds[i] != "logit"]
    idx.sort(key=lambda i: (-abs(infl[i]), i))
    return np.array(idx[:TOP_N])


def _row_point(view, rank):
    """The widget point of the middle of rank's bar row (inside the plot, right of zero)."""
    import pyqtgraph as pg

    vb = view.plot.getViewBox()
    x = 0.5 * float(view.image_data()[rank])
    scene = vb.mapViewToScene(pg.Point(x, rank))
    return view.graphics.mapFromScene(scene)


def test_bars_are_the_top_nodes_by_influence_labelled_and_coloured(qtbot, demo_graph):
    from desktop_app.ui.graph_view import KIND_COLOURS

    _lm, graph = demo_graph
    ex = graph.extras
    view = _view(qtbot, graph)
    top = _expected_top(ex)
    assert len(top) == min(TOP_N, int((np.asarray(ex["node_kind"]) != "logit").sum()))
    assert view.ranking.fitting_rows() == TOP_N  # 700 pixels high: every bar of the top 25 gets its label
    np.testing.assert_array_equal(view.ranking.nodes, top)
    infl = np.asarray(ex["node_influence"], dtype=float)
    np.testing.assert_allclose(view.image_data(), infl[top], rtol=1e-6)
    assert np.all(np.diff(np.abs(view.image_data())) <= 1e-7)  # largest first
    opts = view.ranking.bars.opts
    np.testing.assert_allclose(opts["width"], infl[top], rtol=1e-6)
    np.testing.assert_array_equal(opts["y"], np.arange(len(top)))
    assert view.ranking.bars.isVisible() and not view.line.isVisible() and not view.bars.isVisible()
    kinds = np.asarray(ex["node_kind"]).astype(str)
    assert [b.color().getRgb()[:3] for b in opts["brushes"]] == [KIND_COLOURS[kinds[i]] for i in top]
    tokens = [str(t) for t in ex["prompt_tokens"]]
    ticks = view.plot.getAxis("left")._tickLevels[0]
    labels = [t for _, t in ticks]
    for rank, i in enumerate(top):
        layer, pos, feat = int(ex["node_layer"][i]), int(ex["node_pos"][i]), int(ex["node_feature"][i])
        expected = {"feature": f"L{layer} #{feat} @ {pos} {tokens[pos]}",
                    "error": f"error L{layer} @ {pos} {tokens[pos]}",
                    "embedding": f"emb @ {pos} {tokens[pos]}"}[kinds[i]]
        assert labels[rank] == expected
    assert {"feature", "embedding"} <= set(kinds[top])
    from desktop_app.ui.graph_ranking import node_label

    e = int(np.where(kinds == "error")[0][-1])  # no error node is among the demo's top 25: label one directly
    pos = int(ex["node_pos"][e])
    assert node_label(ex, e) == f"error L{int(ex['node_layer'][e])} @ {pos} {tokens[pos]}"
    bottom = view.plot.getAxis("bottom")
    assert bottom.labelText == AXIS_NAME
    assert bottom.autoSIPrefixScale == 1.0 and bottom.labelUnitPrefix == ""  # ticks read the influence itself
    # every label fits in the axis: none is cut
    axis = view.plot.getAxis("left")
    font = axis.style.get("tickFont") or QFont()
    assert axis.width() >= max(QFontMetricsF(font).horizontalAdvance(t) for t in labels) + 8
    # the logits are named in the plot's title, not ranked
    logit_texts = [str(ex["node_token_text"][i]) for i in np.where(kinds == "logit")[0]]
    title = view.plot.titleLabel.text
    assert all(t in title for t in logit_texts)
    # a lower pane: fewer rows, still the top ones, each with room for its label
    view.resize(900, 320)
    qtbot.waitUntil(lambda: len(view.ranking.nodes) < TOP_N, timeout=3000)
    n = len(view.ranking.nodes)
    np.testing.assert_array_equal(view.ranking.nodes, top[:n])
    np.testing.assert_allclose(view.image_data(), infl[top[:n]], rtol=1e-6)
    assert view.plot.getViewBox().height() / n >= QFontMetricsF(font).height()


def test_hover_gives_the_node_id_and_its_card(qtbot, demo_graph):
    from desktop_app.project.feature_cards import CARDS_KEY, attach_cards, cards_of
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job
    from desktop_app.project.feature_cards import graph_features

    lm, graph = demo_graph
    ex = graph.extras
    view = _view(qtbot, graph)
    kinds = np.asarray(ex["node_kind"]).astype(str)
    rank = int(np.where(kinds[view.ranking.nodes] == "feature")[0][0])
    i = int(view.ranking.nodes[rank])
    assert "density" not in view.ranking.tooltip(rank)  # no cards yet
    cards = drive(transcoder_dashboards_job(lm, demo_transcoders_dir(), demo_corpus_path(),
                                            features=graph_features(graph), n_top=3, context=6, n_logit=3))
    attach_cards(graph, cards, str(demo_corpus_path()), str(demo_transcoders_dir()))
    try:
        tip = view.ranking.tooltip(rank)
        assert str(ex["node_ids"][i]) in tip and "density" in tip and "promotes" in tip
        assert cards_of(graph)[(int(ex["node_layer"][i]), int(ex["node_feature"][i]))] is not None
        viewport = view.graphics.viewport()
        qtbot.mouseMove(viewport, _row_point(view, rank) + QPoint(0, 40))
        qtbot.wait(50)
        qtbot.mouseMove(viewport, _row_point(view, rank))
        qtbot.waitUntil(lambda: str(ex["node_ids"][i]) in view.hover_label.text(), timeout=3000)
    finally:
        graph.extras.pop(CARDS_KEY, None)


def test_the_exported_figure_shows_the_same_ranking(demo_graph, tmp_path):
    from desktop_app.engine.errors import SpecError
    from desktop_app.project.graph_ranking import node_label
    from desktop_app.ui.figure import render_figure
    from desktop_app.ui.figure_data import prepare_data

    _lm, graph = demo_graph
    ex = graph.extras
    top = _expected_top(ex)
    data = prepare_data(graph)
    np.testing.assert_allclose(data.values, np.asarray(ex["node_influence"], dtype=float)[top], rtol=1e-12)
    assert data.dims == ["node"] and data.labels[0] == [node_label(ex, int(i)) for i in top]
    assert any("logits left out" in note for note in data.notes)
    with pytest.raises(SpecError, match="no layer to choose"):
        prepare_data(graph, {"layer": 0})
    path = tmp_path / "graph.svg"
    render_figure(graph, "svg", path)
    text = path.read_text()
    assert "influence on the logits" in text


def test_other_kinds_draw_as_before_after_a_graph(qtbot, demo_graph):
    _lm, graph = demo_graph
    view = _view(qtbot, graph)
    view.set_result(AnalysisResult("t", "token_attribution", {"method": "lime"}, ["position"],
                                   np.array([2.0, -1.0, 0.5]), {"position": ["0: a", "1: b", "2: c"]}))
    assert view.bars.isVisible() and not view.ranking.bars.isVisible()
    np.testing.assert_array_equal(view.image_data(), [2.0, -1.0, 0.5])
    assert not view.plot.titleLabel.isVisible() and view.plot.getAxis("left").fixedWidth is None
    assert view.plot.getAxis("bottom")._siPrefixEnableRanges is None
    assert view.describe((1,)).startswith("position 1: b")


def test_clicking_a_bar_shows_the_node_in_the_graph_view_and_export_works(qtbot, tmp_path):
    from desktop_app.ui import create_main_window

    window = create_main_window(["interp-workbench", "--demo"])
    window.confirm_dialogs = False
    qtbot.addWidget(window)
    window.resize(1600, 1000)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_loaded is not None, timeout=60_000)
        with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
            window.run_named("graph")
        pane, graph_view = window.result_view, window.detail_views["graph"]
        graph = window.project.entry("graph").result
        assert pane.result is graph and graph_view.result is graph
        shown = len(pane.ranking.nodes)  # as many as get a readable label in the pane's height
        assert MIN_ROWS <= shown == pane.ranking.fitting_rows() <= TOP_N
        np.testing.assert_array_equal(pane.ranking.nodes, _expected_top(graph.extras)[:shown])
        axis = pane.plot.getAxis("left")
        tick_px = pane.plot.getViewBox().height() / shown
        assert tick_px >= QFontMetricsF(axis.style.get("tickFont") or QFont()).height()  # labels do not overlap
        qtbot.wait(100)
        rank = 2
        i = int(pane.ranking.nodes[rank])
        qtbot.mouseClick(pane.graphics.viewport(), Qt.LeftButton, pos=_row_point(pane, rank))
        node_id = str(graph.extras["node_ids"][i])
        qtbot.waitUntil(lambda: graph_view.highlighted == i, timeout=3000)
        assert f"<b>{node_id}</b>" in graph_view.card.text()
        np.testing.assert_allclose(graph_view.highlight.data["x"], [graph_view.xy[i, 0]])
        np.testing.assert_allclose(graph_view.highlight.data["y"], [graph_view.xy[i, 1]])
        assert node_id in pane.hover_label.text()
        path = tmp_path / "graph.png"
        assert window.export_figure(path) and path.stat().st_size > 1000
    finally:
        window.close()
        window.runner.shutdown()
