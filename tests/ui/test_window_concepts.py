"""A click on a probe or TCAV bar shows the layer's confusion matrix or score distributions (from the stored
result: no model needed)."""
import numpy as np
from PySide6.QtWidgets import QLabel

from desktop_app.engine.results import AnalysisResult

from ui_helpers import child


def _probe_result():
    confusion = np.array([[[3, 2], [1, 4]], [[5, 0], [1, 4]]])
    return AnalysisResult("probe", "probe", {"hook": "resid_post"}, ["layer"], np.array([0.7, 0.9], np.float32),
                          labels={"layer": ["0", "1"]},
                          extras={"confusion": confusion, "classes": np.array(["neg", "pos"]),
                                  "control_accuracy": np.array([0.5, 0.6], np.float32),
                                  "selectivity": np.array([0.2, 0.3], np.float32),
                                  "majority_accuracy": np.array(0.5, np.float32)})


def _tcav_result():
    return AnalysisResult("tcav", "tcav", {"alpha": 0.05, "bonferroni": False}, ["layer"],
                          np.array([0.5, 0.95], np.float32), labels={"layer": ["0", "1"]},
                          extras={"concept_scores": np.array([[0.5, 1.0], [0.4, 0.9], [0.6, 0.95]], np.float32),
                                  "random_scores": np.array([[0.5, 0.4], [0.6, 0.5], [0.4, 0.6]], np.float32),
                                  "p_value": np.array([0.9, 0.001], np.float32),
                                  "p_value_adjusted": np.array([0.9, 0.001], np.float32),
                                  "significant": np.array([False, True])})


def test_probe_click_shows_the_confusion_matrix(qtbot, window):
    window.show()
    window.analysis_ctl._show_result(_probe_result())
    window._cell_clicked((1,))
    text = child(window, "cellPredictionsLabel", QLabel).text()
    assert "accuracy 0.900, control 0.600, selectivity 0.300" in text
    rows = [line.split() for line in text.replace("</pre>", "\n").split("\n") if line.startswith(("neg", "pos"))]
    assert rows == [["neg", "5", "0"], ["pos", "1", "4"]]


def test_tcav_click_shows_the_score_distributions(qtbot, window):
    window.show()
    window.analysis_ctl._show_result(_tcav_result())
    window._cell_clicked((1,))
    text = child(window, "cellPredictionsLabel", QLabel).text()
    assert "p = 0.001" in text and "significant at 0.05" in text and "not significant" not in text
    assert "0.90 0.95 1.00" in text and "0.40 0.50 0.60" in text


def test_steering_click_shows_tokens_and_continuations(qtbot, window):
    window.show()
    r = AnalysisResult("steer", "steering", {}, ["which", "rank"], np.array([[0.5, 0.2], [0.6, 0.1]], np.float32),
                       labels={"which": ["before", "after"], "rank": ["1", "2"]},
                       extras={"top_tokens": np.array([["·Mary", "·John"], ["·John", "·Mary"]]),
                               "kl": np.array(0.25, np.float32),
                               "continuation": np.array([" Mary went home", " John went out"])})
    window.analysis_ctl._show_result(r)
    window._cell_clicked((1, 0))
    text = child(window, "cellPredictionsLabel", QLabel).text()
    assert "KL(before || after) = 0.25" in text
    assert "continuation before:  Mary went home" in text and "continuation after:   John went out" in text
