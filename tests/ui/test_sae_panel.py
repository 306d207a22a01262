"""The SAE feature pane on hand-made results (no model, no torch): heatmap, token table, dashboards, edits."""
import subprocess
import sys

import numpy as np
import pytest
from PySide6.QtCore import Qt

from desktop_app.engine.results import AnalysisResult
from desktop_app.engine.sae.dashboards import FeatureDashboard, TopContext
from desktop_app.ui.sae_panel import SAEFeatureView

TOKENS = ["0: When", "1: ·Mary", "2: ·and", "3: ·John"]
FEATURES = [2, 7, 9]


def features_result():
    values = np.array([[0.0, 1.0, 0.5], [2.0, 0.0, 0.0], [0.1, 0.3, 0.2], [0.0, 0.0, 4.0]], dtype=np.float32)
    return AnalysisResult(name="sae", kind="sae_features", params={"hook": "blocks.1.hook_resid_pre"},
                          dims=["position", "feature"], values=values,
                          labels={"position": TOKENS, "feature": [str(f) for f in FEATURES]})


def dashboards():
    return [
        FeatureDashboard(feature=7, max_activation=3.0, density=0.1, n_tokens=100,
                         top_contexts=[TopContext(tokens=["When", "·Mary", "·left"], max_index=1, activation=3.0,
                                                  activations=[0.0, 3.0, 0.5])],
                         histogram_counts=[1, 2], histogram_edges=[0.1, 1.0, 10.0], promoted=[("·store", 1.2)]),
        FeatureDashboard(feature=9, max_activation=1.0, density=0.02, n_tokens=100,
                         top_contexts=[TopContext(tokens=["a", "·drink"], max_index=1, activation=1.0,
                                                  activations=[0.0, 1.0])],
                         histogram_counts=[0, 3], histogram_edges=[0.1, 1.0, 10.0]).to_dict(),
    ]


@pytest.fixture
def view(qtbot):
    w = SAEFeatureView()
    qtbot.addWidget(w)
    w.show()
    return w


def test_heatmap_and_top_feature_table(view):
    assert view.objectName() == "saeFeatureView"
    view.show_result(features_result())
    img = view.image_data()
    assert img.shape == (3, 4)  # features x tokens
    np.testing.assert_array_equal(img, features_result().values.T)
    assert view.token_combo.count() == 4 and view.token_combo.currentIndex() == 3
    assert view.top_features_shown() == [(9, 4.0)]
    view.select_token(2)
    assert view.top_features_shown() == [(7, 0.3), (9, 0.2), (2, 0.1)]
    view.table.cellClicked.emit(0, 0)
    assert view.feature_spin.value() == 7


def test_apply_emits_intervention_request(view, qtbot):
    view.show_result(features_result())
    view.feature_spin.setValue(9)
    view.mode_combo.setCurrentText("clamp")
    view.value_spin.setValue(2.5)
    view.keep_error_check.setChecked(False)
    with qtbot.waitSignal(view.interventionRequested, timeout=2000) as blocker:
        qtbot.mouseClick(view.findChild(type(view.apply_button), "saeApplyButton"), Qt.LeftButton)
    assert blocker.args[0] == {"edits": [{"feature": 9, "mode": "clamp", "value": 2.5, "positions": None}],
                               "keep_error": False}


def test_dashboard_browser_search_and_highlight(view):
    view.show_dashboards(dashboards())
    assert view.listed_features() == [7, 9]
    html = view.context_view.toHtml()
    assert "Feature 7" in html and "Mary" in html and "store" in html
    view.search_edit.setText("drink")
    assert view.listed_features() == [9]
    view.search_edit.setText("store")
    assert view.listed_features() == [7]
    view.search_edit.setText("nothing-here")
    assert view.listed_features() == []


def test_show_intervention(view):
    result = AnalysisResult(
        name="edit", kind="sae_intervention", params={}, dims=["which", "rank"],
        values=np.array([[0.6, 0.3], [0.2, 0.7]], dtype=np.float32),
        labels={"which": ["before", "after"], "rank": ["1", "2"]},
        extras={"top_tokens": np.array([["·Mary", "·John"], ["·John", "·Mary"]]), "kl": np.array(0.42),
                "continuation": np.array([" Mary went home", " John <&> left"])})
    view.show_intervention(result)
    text = view.intervention_view.toPlainText()
    assert "·Mary" in text and "0.700" in text and "John <&> left" in text and "0.42" in text


def test_module_imports_without_torch():
    code = ("import sys; import desktop_app.ui.sae_panel; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
