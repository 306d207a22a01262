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
