"""Results over a dataset in the window: the pair picker, the standard error on hover and the per-pair bars."""
import numpy as np
import pytest
from PySide6.QtCore import QPointF, Qt
from PySide6.QtWidgets import QComboBox

from desktop_app.engine.datasets import PairText
from desktop_app.project.dataset_edit import SetPairs

from ui_helpers import child, load_model

TEMPLATE = "When {A} and {B} went to the store, {S} gave a drink to"
NAMES = [("Mary", "John"), ("John", "Mary"), ("Mary", "John")]


def _pairs():
    out = []
    for k, (a, b) in enumerate(NAMES):
        clean = TEMPLATE.format(A=a, B=b, S=b)
        corrupted = TEMPLATE.format(A=a, B=b, S=a)
        if k == 2:  # a third, different pair of the same length
            clean, corrupted = corrupted, clean
        out.append(PairText(clean, corrupted, " " + (a if k != 2 else b), " " + (b if k != 2 else a)))
    return out


@pytest.fixture
def dataset_result(qtbot, window, ioi_gpt2_dir):
    load_model(qtbot, window, ioi_gpt2_dir)
    window.session.push(SetPairs(window.project, _pairs(), "set"))
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("activation_patching"))
    child(window, "componentCombo", QComboBox).setCurrentText("resid_pre")
    child(window, "metricCombo", QComboBox).setCurrentText("logit_diff")
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
        qtbot.mouseClick(child(window, "runButton"), Qt.LeftButton)
    assert ended.args[0] == "done", window.message_bar.text()
    result = window.current_result()
    assert result.extras["values_per_pair"].shape == (3,) + result.values.shape
    return result


def test_picking_a_pair_shows_exactly_its_values(qtbot, window, dataset_result):
    view = child(window, "heatmapView")
    pair_combo = child(window, "pairCombo", QComboBox)
    assert pair_combo.isVisible() and [pair_combo.itemText(i) for i in range(4)] == ["mean", "pair 0", "pair 1",
                                                                                     "pair 2"]
    per_pair = dataset_result.extras["values_per_pair"]
    np.testing.assert_array_equal(view.image_data(), dataset_result.values.astype(np.float32))
    np.testing.assert_allclose(view.image_data(), per_pair.mean(axis=0), atol=1e-5)  # the mean is of those pairs
    for i in range(3):
        pair_combo.setCurrentIndex(i + 1)
        np.testing.assert_array_equal(view.image_data(), per_pair[i].astype(np.float32))
        assert f"pair {i} of 3" in child(window, "resultTitle").text()
    assert not np.array_equal(per_pair[0], per_pair[1])  # the test can tell the pairs apart
    pair_combo.setCurrentIndex(0)
    np.testing.assert_array_equal(view.image_data(), dataset_result.values.astype(np.float32))


def test_hover_shows_the_standard_error_beside_the_mean(qtbot, window, dataset_result):
    view = child(window, "heatmapView")
    r, c = 1, 3
    per_pair = dataset_result.extras["values_per_pair"][:, r, c].astype(np.float64)
    sem = per_pair.std(ddof=1) / np.sqrt(3)  # the reference: the sample standard error of 3 pairs
    scene = view.plot.getViewBox().mapViewToScene(QPointF(c + 0.5, r + 0.5))
    view._on_mouse_moved(scene)
    text = child(window, "hoverLabel").text()
    assert f"= {per_pair.mean():.4g} ± {sem:.4g} (standard error)" in text, text
    child(window, "pairCombo", QComboBox).setCurrentIndex(2)
    view._on_mouse_moved(scene)
    text = child(window, "hoverLabel").text()
    assert f"of pair 1 = {per_pair[1]:.4g}" in text and "±" not in text


def test_a_clicked_cell_shows_each_pairs_clean_corrupted_and_patched_metric(qtbot, window, dataset_result):
    view = child(window, "heatmapView")
    view.cell_clicked.emit((1, 4), float(view.image_data()[1, 4]))
    bars = child(window, "pairBarsView")
    assert bars.isVisible()
    np.testing.assert_array_equal(bars.values["patched"], dataset_result.extras["values_per_pair"][:, 1, 4])
    np.testing.assert_array_equal(bars.values["clean"], dataset_result.extras["clean_metric"])
    np.testing.assert_array_equal(bars.values["corrupted"], dataset_result.extras["corrupted_metric"])
    assert len(bars._items) == 3


def test_a_named_dataset_whose_first_pair_differs_in_length_runs_in_the_window(qtbot, window, ioi_gpt2_dir):
    from desktop_app.engine import templates

    load_model(qtbot, window, ioi_gpt2_dir)
    pairs = list(templates.ioi_pairs(3, seed=1, order="ABBA", templates=(templates.IOI_TEMPLATES[0],),
                                     names=["Mary", "John", "Alice", "Bob", "Zyxwqvutsr"]).pairs)
    lengths = [(p.clean, p.corrupted) for p in pairs]
    window.session.push(SetPairs(window.project, pairs, "set"))
    qtbot.waitUntil(lambda: window.dataset_ctl.checks is not None, timeout=20_000)
    checks = window.dataset_ctl.checks
    assert any(len(c.tokens["clean"]) != len(c.tokens["corrupted"]) for c in checks), lengths  # the case tested
    assert all(not c.problems for c in checks)  # named positions align them: no flag
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("activation_patching"))
    child(window, "componentCombo", QComboBox).setCurrentText("resid_pre")
    child(window, "positionsCombo", QComboBox).setCurrentText("named")
    child(window, "metricCombo", QComboBox).setCurrentText("logit_diff")
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
        qtbot.mouseClick(child(window, "runButton"), Qt.LeftButton)
    assert ended.args[0] == "done", window.message_bar.text()
    result = window.current_result()
    assert list(result.labels["position"]) == ["IO", "S1", "S2", "END"]
    child(window, "pairCombo", QComboBox).setCurrentIndex(2)
    np.testing.assert_array_equal(child(window, "heatmapView").image_data(), result.extras["values_per_pair"][1])
