"""What the screenshots showed wrong, kept fixed: the result pane names the model, bars below zero of a diverging
value are blue, the heads field says heads, the attention thumbnails say which layer and head they are."""
import numpy as np
from PySide6.QtWidgets import QComboBox, QLineEdit
from ui_helpers import child, load_model, type_prompts

from desktop_app.engine.results import AnalysisResult


def test_the_result_title_names_the_model_it_was_computed_with(qtbot, window, ioi_gpt2_dir):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        child(window, "runButton").click()
    assert f"model {ioi_gpt2_dir.name}" in child(window, "resultTitle").text()


def test_negative_bars_of_a_diverging_value_are_blue(qtbot):
    from desktop_app.ui.plots import ResultView

    view = ResultView()
    qtbot.addWidget(view)
    view.set_result(AnalysisResult("t", "token_attribution", {"method": "lime"}, ["position"],
                                   np.array([2.0, -1.0, 0.5]), {"position": ["0: a", "1: b", "2: c"]}))
    colours = [b.color().getRgb()[:3] for b in view.bars.opts["brushes"]]
    assert colours == [(178, 24, 43), (33, 102, 172), (178, 24, 43)]


def test_the_heads_field_says_heads(window):
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("attention_patterns"))
    assert child(window, "headsEdit", QLineEdit).placeholderText().startswith("all heads")
    assert child(window, "layersEdit", QLineEdit).placeholderText().startswith("all layers")


def test_attention_thumbnails_are_labelled_by_layer_and_head(qtbot):
    from desktop_app.ui.attention_view import AttentionPatternView

    view = AttentionPatternView()
    qtbot.addWidget(view)
    view.show_result(AnalysisResult("a", "attention_patterns", {}, ["layer", "head", "query", "key"],
                                    np.full((2, 3, 4, 4), 0.25), {"layer": ["0", "5"], "head": ["0", "1", "2"]}))
    texts = sorted(item.text for item in view.thumbs.ci.items if hasattr(item, "text"))
    assert texts == ["head 0", "head 1", "head 2", "layer 0", "layer 5"]
