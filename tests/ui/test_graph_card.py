"""Feature cards in the graph view: hovering a feature node shows its top contexts (peak token highlighted, with its
activation), promoted / suppressed tokens and density; without cards one line says how to build them; in the
window the demo graph gets its cards built in the runner (equal to a fresh computation) and saved with the project."""
from html import escape

import numpy as np
import pytest
from PySide6.QtCore import QPoint, Qt
from PySide6.QtWidgets import QLabel

from desktop_app.demo_assets import demo_corpus_path, demo_transcoders_dir
from desktop_app.engine.jobs import drive
from desktop_app.project.feature_cards import CARDS_KEY, attach_cards, cards_of, graph_features
from desktop_app.ui.graph_card import NO_CARDS, N_CONTEXTS, N_TOKENS, WINDOW

def fresh_cards(lm, graph):
    from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job

    return drive(transcoder_dashboards_job(lm, demo_transcoders_dir(), demo_corpus_path(),
                                           features=graph_features(graph), n_top=N_CONTEXTS, context=WINDOW,
                                           n_logit=N_TOKENS))


def _view(qtbot, result):
    from desktop_app.ui.graph_view import GraphView

    view = GraphView()
    qtbot.addWidget(view)
    view.resize(1100, 700)
    view.show()
    qtbot.waitExposed(view)
    view.show_result(result)
    qtbot.wait(100)  # the plot lays out its range before node positions map to the screen
    return view


def _hover(qtbot, view, i):
    """Move the mouse onto node i's marker in the plot."""
    import pyqtgraph as pg

    vb = view.plot.getViewBox()
    scene = vb.mapViewToScene(pg.Point(*view.xy[i]))
    viewport = view.plot_widget.viewport()
    point = view.plot_widget.mapFromScene(scene)
    qtbot.mouseMove(viewport, QPoint(point.x() + 30, point.y() + 30))  # somewhere else first
    qtbot.wait(60)  # a move right after another can be merged into it
    qtbot.mouseMove(viewport, point)
    qtbot.wait(60)


def _busiest_feature(view, graph):
    """A shown feature node whose card has contexts, the most influential such."""
    ex = graph.extras
    cards = cards_of(graph)
    order = np.argsort(-np.asarray(ex["node_influence"], dtype=float))
    for i in order:
        key = (int(ex["node_layer"][i]), int(ex["node_feature"][i]))
        if ex["node_kind"][i] == "feature" and view.node_mask[i] and cards.get(key) and cards[key].top_contexts:
            return int(i), cards[key]
    raise AssertionError("no feature node with contexts")


def test_hovering_a_feature_node_shows_its_contexts(qtbot, demo_graph):
    lm, graph = demo_graph
    attach_cards(graph, fresh_cards(lm, graph), str(demo_corpus_path()), str(demo_transcoders_dir()))
    try:
        view = _view(qtbot, graph)
        i, card = _busiest_feature(view, graph)
        label = view.findChild(QLabel, "graphNodeCard")
        _hover(qtbot, view, i)
        qtbot.waitUntil(lambda: str(graph.extras["node_ids"][i]) in label.text(), timeout=3000)
        text = label.text()
        assert f"{float(graph.extras['node_activation'][i]):.4g}" in text
        assert f"density {100 * card.density:.3g}%" in text and "corpus.txt" in text
        top = card.top_contexts[0]
        peak = escape(top.tokens[top.max_index].replace("·", " "))
        assert f"<b>{peak}</b>" in text and f"{top.activation:.3g}" in text  # the peak token, highlighted
        assert text.count("<tr>") == min(len(card.top_contexts), N_CONTEXTS)
        word, value = card.promoted[0]
        assert "promotes" in text and f"{escape(word.replace('·', ' '))}&nbsp;{value:+.3g}" in text
        word, value = card.suppressed[0]
        assert "suppresses" in text and f"{escape(word.replace('·', ' '))}&nbsp;{value:+.3g}" in text
        status = view.findChild(QLabel, "graphCardsStatus").text()
        assert f"{len(graph_features(graph))} cards from corpus.txt" in status
        # a non-feature node keeps its plain card
        e = int(np.where(graph.extras["node_kind"] == "embedding")[0][0])
        view.hover_node(e)
        assert "promotes" not in label.text()
    finally:
        graph.extras.pop(CARDS_KEY, None)


def test_without_cards_one_line_says_how_to_build_them(qtbot, demo_graph):
    _lm, graph = demo_graph
    view = _view(qtbot, graph)
    f = int(np.where(graph.extras["node_kind"] == "feature")[0][0])
    view.hover_node(f)
    text = view.findChild(QLabel, "graphNodeCard").text()
    assert NO_CARDS in text and "<tr>" not in text
    view.cards.build(str(demo_corpus_path()))  # not attached to a window: says so, runs nothing
    assert "not attached to a window" in view.findChild(QLabel, "graphCardsStatus").text()


def test_window_builds_the_demo_cards_and_saves_them(qtbot, demo_graph, tmp_path):
    from desktop_app.project.iwb import load_project
    from desktop_app.ui import create_main_window

    lm, reference_graph = demo_graph
    window = create_main_window(["interp-workbench", "--demo"])
    window.confirm_dialogs = False
    qtbot.addWidget(window)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_loaded is not None, timeout=60_000)
        with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
            window.run_named("graph")
        view = window.detail_views["graph"]
        graph = window.project.entry("graph").result
        assert view.result is graph
        qtbot.waitUntil(lambda: bool(cards_of(graph)), timeout=30_000)  # built at once for the demo's transcoders
        assert window.project.dirty
        got, expected = cards_of(graph), fresh_cards(lm, graph)
        assert list(got) == graph_features(graph)
        for card in expected:
            mine = got[(card.layer, card.feature)]
            assert mine.density == pytest.approx(card.density, abs=1e-12)
            np.testing.assert_allclose([c.activation for c in mine.top_contexts],
                                       [c.activation for c in card.top_contexts], atol=1e-5)
            assert [c.tokens for c in mine.top_contexts] == [c.tokens for c in card.top_contexts]
            assert [t for t, _ in mine.promoted] == [t for t, _ in card.promoted]
        i, card = _busiest_feature(view, graph)
        _hover(qtbot, view, i)
        label = view.findChild(QLabel, "graphNodeCard")
        qtbot.waitUntil(lambda: "promotes" in label.text(), timeout=3000)
        assert view.cards.button.text() == "Feature cards…"
        # saved and re-opened: the same cards, nothing recomputed
        assert window.save_to(tmp_path / "demo.iwb")
        back = load_project(tmp_path / "demo.iwb").entry("graph").result
        assert cards_of(back) == got
        # the button with another corpus rebuilds them from that file
        corpus = tmp_path / "other.txt"
        corpus.write_text("When Anna and Tom went to the park, Tom gave a book to Anna.\n")
        with qtbot.waitSignal(window.runner.finished, timeout=30_000):
            assert view.cards.build(str(corpus)) is not None
        qtbot.waitUntil(lambda: "other.txt" in view.findChild(QLabel, "graphCardsStatus").text(), timeout=5000)
        from desktop_app.engine.sae.corpus import tokenize_documents
        n_tokens = len(tokenize_documents(lm, [corpus.read_text().strip()])[0])
        assert next(iter(cards_of(graph).values())).n_tokens == n_tokens
        # a second click while it runs cancels it, and the cards already there stay
        big = tmp_path / "big.txt"
        big.write_text(demo_corpus_path().read_text() * 40)
        status = view.findChild(QLabel, "graphCardsStatus")
        assert view.cards.build(str(big)) is not None
        qtbot.waitUntil(lambda: "batch" in status.text(), timeout=30_000)
        qtbot.mouseClick(view.cards.button, Qt.LeftButton)
        qtbot.waitUntil(lambda: "cancelled" in status.text(), timeout=30_000)
        assert next(iter(cards_of(graph).values())).n_tokens == n_tokens
        assert view.cards.button.text() == "Feature cards…"
    finally:
        window.close()
        window.runner.shutdown()
