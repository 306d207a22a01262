"""The Model pane shows the load-time conformance checks (one line, details in the tooltip)."""
from ui_helpers import load_model


def test_model_pane_shows_the_conformance_line(qtbot, window, llama_dir):
    load_model(qtbot, window, llama_dir)
    assert window.model_loaded is not None
    summary = window.model_panel.summary
    assert "conformance (6 checks" in summary.text() and "all passed" in summary.text()
    assert summary.toolTip().startswith("conformance (6 checks")
    assert window.project.model.conformance["family"] == "llama"
