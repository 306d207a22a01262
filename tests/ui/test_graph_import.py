"""File > Open graph JSON…: a graph written by the exporter opens in the window as an undoable analysis whose
result is shown in the graph view with the file's nodes; a graph of another model is refused in one sentence."""
import json

import numpy as np
import pytest

from desktop_app.demo_assets import resources_dir
from desktop_app.ui import create_main_window


@pytest.fixture(scope="module")
def demo_graph():
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model

    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    return drive(attribution_graph_job(lm, tokens, str(demo / "transcoders"), max_n_logits=5))


@pytest.fixture
def demo_window(qtbot):
    window = create_main_window(["interp-workbench", "--demo"])
    window.confirm_dialogs = False
    qtbot.addWidget(window)
    window.show()
    qtbot.waitUntil(lambda: window.model_loaded is not None, timeout=60_000)
    yield window
    window.close()
    window.runner.shutdown()


def test_open_graph_json_shows_it_and_undoes(qtbot, demo_window, demo_graph, tmp_path):
    from desktop_app.project.graph_json import write_graph_json
    from desktop_app.ui import graph_import

    window = demo_window
    assert window.findChild(type(window.act_open_graph), "actionOpenGraphJson") is window.act_open_graph
    path = write_graph_json(demo_graph, tmp_path / "ioi graph.json")
    before = window.project.names()
    name = graph_import.open_graph_json(window, path)
    assert name is not None and window.project.names() == before + [name]
    qtbot.waitUntil(lambda: "graph" in getattr(window, "detail_views", {}), timeout=5000)
    view = window.detail_views["graph"]
    assert view.result is window.project.entry(name).result
    n = len(demo_graph.extras["node_ids"])
    assert len(view.ids) == n and view.shown_counts()[0] == n
    assert np.array_equal(view.adjacency != 0, demo_graph.extras["adjacency"] != 0)
    assert not window.session.stale_reason(name)
    window.session.undo.undo()
    assert window.project.names() == before
    window.session.undo.redo()
    assert window.project.names() == before + [name]


def test_graph_of_another_model_is_refused(qtbot, demo_window, demo_graph, tmp_path):
    from desktop_app.project.graph_json import write_graph_json
    from desktop_app.ui import graph_import

    window = demo_window
    path = write_graph_json(demo_graph, tmp_path / "g.json")
    doc = json.loads(path.read_text())
    for node in doc["nodes"]:
        if node["feature_type"] == "logit":
            node["layer"] = str(int(node["layer"]) + 4)  # a deeper model's logit row
    path.write_text(json.dumps(doc))
    before = window.project.names()
    assert graph_import.open_graph_json(window, path) is None
    assert window.project.names() == before
    text = window.message_bar.text()
    assert "other layers" in text and text.count(". ") == 0 and window.message_bar.level == "error"


def _demo_check_setup(demo_window, demo_graph):
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoders import load_transcoder_set
    from desktop_app.project import kinds
    from desktop_app.ui.kind_views import show_detail

    window = demo_window
    demo_graph.params["pinned_ids"] = []  # the module's graph is shared: start with nothing pinned
    _add_as_computed(window, demo_graph, window.loaded_ref)
    show_detail(window, demo_graph, kinds.get("attribution_graph"))
    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    tset = load_transcoder_set(demo_graph.params["transcoders"], n_layers=lm.info.n_layers, d_model=lm.info.d_model)
    return window.detail_views["graph"], lm, tset


def _table_matches(table, check, texts):
    from desktop_app.ui.graph_clamp import MEASURED

    assert table.rowCount() == len(check["logit_tokens"]) and table.columnCount() == 1 + len(MEASURED)
    for r in range(table.rowCount()):
        assert table.item(r, 0).text() == texts[r]
        for c, key in enumerate(MEASURED, start=1):
            assert float(table.item(r, c).text()) == pytest.approx(check[key][r], abs=1e-4), key


def test_clamp_button_shows_clamp_check_numbers(qtbot, demo_window, demo_graph):
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QDoubleSpinBox, QLabel, QPushButton, QTableWidget

    from desktop_app.engine.graph_check import clamp_check

    view, lm, tset = _demo_check_setup(demo_window, demo_graph)
    button = view.findChild(QPushButton, "graphClampButton")
    assert not button.isEnabled()  # nothing pinned
    assert view.findChild(QDoubleSpinBox, "graphClampValue").value() == 0  # the default ablates
    ex = demo_graph.extras
    f = np.where(ex["node_kind"] == "feature")[0]
    node = str(ex["node_ids"][f[int(np.argmax(ex["node_influence"][f]))]])
    view.toggle_pin(node)
    assert button.isEnabled()
    table = view.findChild(QTableWidget, "graphCheckTable")
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: table.rowCount() > 0, timeout=30_000)
    s = list(ex["node_ids"]).index(node)
    direct = clamp_check(lm, list(demo_graph.tokens_clean), tset, ex, node, -float(ex["node_activation"][s]))
    _table_matches(table, direct, lm.tokens_of_ids(direct["logit_tokens"]).display)
    for key in ("predicted", "measured_graph", "measured_frozen", "measured_real"):
        np.testing.assert_allclose(view.clamp.check[key], direct[key], atol=1e-6)
    assert np.abs(direct["measured"]).max() > 1e-3  # the clamp does move the logits
    status = view.findChild(QLabel, "graphCheckStatus").text()
    assert f"{node} ablated" in status and "Exact: the graph's own model" in status
    assert direct["crossing_text"] in status


def test_clamp_a_supernode_by_a_multiplier(qtbot, demo_window, demo_graph):
    """A supernode (GraphView.selected_group() through graph_clamp.clamp_targets) clamped
    together: the table equals the engine's all-at-once check with each activation doubled."""
    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QComboBox, QDoubleSpinBox, QPushButton, QTableWidget

    from desktop_app.engine.graph_check import clamp_check
    from desktop_app.ui.graph_clamp import MULTIPLY, clamp_targets

    view, lm, tset = _demo_check_setup(demo_window, demo_graph)
    ex = demo_graph.extras
    f = np.where(ex["node_kind"] == "feature")[0]
    nodes = [str(ex["node_ids"][i]) for i in f[np.argsort(-ex["node_influence"][f])][:3]]
    view.toggle_pin(nodes[0])
    assert clamp_targets(view) == [nodes[0]]
    logit = str(ex["node_ids"][np.where(ex["node_kind"] == "logit")[0][0]])
    view.group(nodes + [logit], "candidate circuit")
    view.panel.select_group(0)
    assert view.selected_group() == ("candidate circuit", nodes + [logit])
    assert clamp_targets(view) == nodes  # a logit in the group is not clamped
    view.redraw()
    assert view.clamp.node_ids == nodes
    view.findChild(QComboBox, "graphClampMode").setCurrentText(MULTIPLY)
    view.findChild(QDoubleSpinBox, "graphClampValue").setValue(2.0)
    table = view.findChild(QTableWidget, "graphCheckTable")
    qtbot.mouseClick(view.findChild(QPushButton, "graphClampButton"), Qt.LeftButton)
    qtbot.waitUntil(lambda: table.rowCount() > 0, timeout=30_000)
    acts = [float(ex["node_activation"][list(ex["node_ids"]).index(n)]) for n in nodes]
    direct = clamp_check(lm, list(demo_graph.tokens_clean), tset, ex, nodes, acts)
    _table_matches(table, direct, lm.tokens_of_ids(direct["logit_tokens"]).display)
    assert "3 features multiplied by 2" in view.clamp.status.text()


def _add_as_computed(window, result, model_ref):
    """`result` added to the project as an analysis computed with `model_ref`."""
    from desktop_app.project import kinds
    from desktop_app.project.document import AnalysisEntry, model_fingerprint
    from desktop_app.project.undo import AddAnalysis

    spec = kinds.get("attribution_graph").spec(name="graph under test", transcoders=result.params["transcoders"])
    window.session.push(AddAnalysis(window.project, AnalysisEntry(spec, result, result_spec=spec,
                                                                  result_model=model_fingerprint(model_ref))))


def test_clamp_refuses_a_graph_of_another_model(qtbot, demo_window, demo_graph):
    import dataclasses

    from PySide6.QtCore import Qt
    from PySide6.QtWidgets import QLabel, QPushButton, QTableWidget

    from desktop_app.project import kinds
    from desktop_app.ui.kind_views import show_detail

    window = demo_window
    other = dataclasses.replace(window.loaded_ref, path="/elsewhere/another-model", config_hash="0" * 16)
    _add_as_computed(window, demo_graph, other)
    show_detail(window, demo_graph, kinds.get("attribution_graph"))
    view = window.detail_views["graph"]
    ex = demo_graph.extras
    f = np.where(ex["node_kind"] == "feature")[0]
    view.toggle_pin(str(ex["node_ids"][f[0]]))
    submitted = []
    view.clamp.submit = lambda *args, **kwargs: submitted.append(args)
    qtbot.mouseClick(view.findChild(QPushButton, "graphClampButton"), Qt.LeftButton)
    assert submitted == []  # nothing ran on the loaded model with this graph's token ids
    assert view.findChild(QTableWidget, "graphCheckTable").rowCount() == 0
    assert "not computed with the loaded model" in view.findChild(QLabel, "graphCheckStatus").text()
