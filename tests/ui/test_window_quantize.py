"""The quantize combo of the model pane: the loaded model is int8 and the status bar shows its weights' memory."""
import pytest

from ui_helpers import child, load_model

pytest.importorskip("bitsandbytes")


def test_quantize_combo_loads_int8(qtbot, window, gpt2_dir):
    combo = child(window, "quantizeCombo")
    assert [combo.itemText(i) for i in range(combo.count())] == ["none", "int8", "int4"]
    combo.setCurrentText("int8")
    load_model(qtbot, window, gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    assert window.model_loaded.info["quantize"] == "int8"
    assert window.project.model.quantize == "int8"
    assert window.memory_label.text().startswith("weights: ") and window.memory_label.text().endswith("(int8)")
    assert "int8" in child(window, "modelSummaryLabel").text()
