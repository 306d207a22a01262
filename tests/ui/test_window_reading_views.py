"""The detail views keyed by view type: lens grid (top token in each cell), attention patterns (thumbnails to
click), token strips (methods side by side with their deletion curves), driven through the real window."""
import numpy as np
from PySide6.QtWidgets import QComboBox

from ui_helpers import child, load_model, type_prompts


def _run(qtbot, window, kind, **values):
    from desktop_app.project import kinds
    from desktop_app.project.specs import panel_fields

    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData(kind))
    fields = {f.name: f for f in panel_fields(kinds.get(kind).spec)}
    for name, value in values.items():
        widget = window.analysis_panel.findChild(QComboBox, name + "Combo")
        assert widget is not None and name in fields, name
        widget.setCurrentText(value)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
        child(window, "runButton").click()
    assert ended.args == ["done"], window.message_bar.text()
    return window.project.analyses[-1].result


def test_reading_views_show_the_results(qtbot, window, gpt2_dir):
    load_model(qtbot, window, gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    type_prompts(window)

    lens = _run(qtbot, window, "logit_lens", target="prediction")
    dock = child(window, "detailDock")
    assert dock.isVisible()
    view = child(window, "lensGridView")
    assert view.result is lens and len(view.texts) == lens.values.size
    assert view.texts[-1].toPlainText() == str(lens.extras["top_token_text"][-1, -1, 0])[:7]
    text = view.cell_text(1, 3)
    assert "rank" in text and str(lens.extras["top_token_text"][1, 3, 0]) in text
    np.testing.assert_allclose(view.rank_line.yData, lens.extras["target_rank"][:, -1] + 1)  # (log axis)

    patterns = _run(qtbot, window, "attention_patterns")
    att = child(window, "attentionPatternView")
    assert att.result is patterns and dock.isVisible()
    att.select(1, 2)
    np.testing.assert_allclose(att.image.image, patterns.values[1, 2], atol=1e-6)
    assert "head 2" in att.title.text()

    _run(qtbot, window, "token_attribution", method="saliency", baseline="zero")
    second = _run(qtbot, window, "token_attribution", method="occlusion", baseline="zero")
    strip = child(window, "tokenStripView")
    assert strip.shown[0] is second and len(strip.shown) == 2  # both methods on the same tokens, side by side
    assert "occlusion" in strip.strips.text() and "saliency" in strip.strips.text()
    assert len(strip.curve_plot.listDataItems()) == 2


def test_strip_colours_are_centred_on_zero(qapp):
    from desktop_app.engine.results import AnalysisResult
    from desktop_app.ui.token_strip_view import strip_html

    r = AnalysisResult("t", "token_attribution", {"method": "lime"}, ["position"], np.array([-2.0, 0.0, 2.0]),
                       labels={"position": ["0: ·a", "1: ·b", "2: ·c"]})
    html = strip_html(r)
    assert "rgb(255,255,255)" in html  # 0 is white
    assert html.index("·a") < html.index("·b") < html.index("·c")


def test_double_clicking_a_pattern_hook_point_opens_its_patterns(qtbot, window, gpt2_dir):
    from PySide6.QtCore import Qt

    load_model(qtbot, window, gpt2_dir)
    type_prompts(window)
    tree = child(window, "layerTree")
    items = [tree.topLevelItem(i) for i in range(tree.topLevelItemCount())]
    target = None
    while items:
        item = items.pop(0)
        data = item.data(0, Qt.UserRole)
        if data and data[0] == "blocks.1.attn.hook_pattern":
            target = item
        items.extend(item.child(i) for i in range(item.childCount()))
    assert target is not None
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        tree.itemDoubleClicked.emit(target, 0)
    result = window.project.analyses[-1].result
    assert result.kind == "attention_patterns" and result.labels["layer"] == ["1"]
    assert child(window, "attentionPatternView").result is result
