"""Fixtures for window tests: private settings / autosave / recent folders, and the real main window."""
import pytest


@pytest.fixture(autouse=True)
def _private_app_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("INTERP_WORKBENCH_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def window(qtbot):
    from desktop_app.ui import create_main_window

    w = create_main_window([])
    w.confirm_dialogs = False
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    yield w
    if w.isVisible():
        w.close()
    w.runner.shutdown()


@pytest.fixture(scope="module")
def demo_graph():
    """The bundled demo model and its attribution graph of the IOI prompt (per module: tests attach cards to it)."""
    from desktop_app.demo_assets import demo_transcoders_dir, resources_dir
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model

    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    prompt = "When Mary and John went to the store, John gave a drink to"
    graph = drive(attribution_graph_job(lm, lm.tokenize(prompt, True), str(demo_transcoders_dir()), max_n_logits=5))
    return lm, graph
