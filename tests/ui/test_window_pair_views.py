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


def _reference_top5(model_dir, clean_ids, corrupted_ids, layer, position):
    """An independent forward pass: the corrupted run of one pair with the clean residual stream written into
    block `layer`'s input at `position` (transformers' own GPT-2, a forward pre-hook)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    block = model.transformer.h[layer]
    saved = {}

    def record(_module, args, kwargs):
        saved["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

    def write(_module, args, kwargs):
        x = (args[0] if args else kwargs["hidden_states"]).clone()
        x[:, position] = saved["x"][:, position]
        return ((x,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    with torch.no_grad():
        h = block.register_forward_pre_hook(record, with_kwargs=True)
        model(torch.tensor([clean_ids]))
        h.remove()
        h = block.register_forward_pre_hook(write, with_kwargs=True)
        logits = model(torch.tensor([corrupted_ids])).logits
        h.remove()
    top = torch.topk(torch.softmax(logits[0, -1].float(), -1), 5)
    return top.indices.tolist(), top.values.tolist()


def test_a_picked_pairs_cell_shows_that_pairs_own_predictions(qtbot, window, dataset_result, ioi_gpt2_dir):
    from transformers import AutoTokenizer

    view = child(window, "heatmapView")
    label = child(window, "cellPredictionsLabel")
    # the mean: no pair's predictions pretend to be the mean's
    window.predictions = None
    view.cell_clicked.emit((1, 4), float(view.image_data()[1, 4]))
    assert "pick a pair" in label.text() and window.predictions is None

    pairs = _pairs()
    tok = AutoTokenizer.from_pretrained(ioi_gpt2_dir)
    clean = [int(i) for i in dataset_result.tokens_clean[2] if i >= 0]
    corrupted = [int(i) for i in dataset_result.tokens_corrupted[2] if i >= 0]
    assert tok(pairs[2].clean)["input_ids"] == clean[-len(tok(pairs[2].clean)["input_ids"]):]
    position = [i for i, (a, b) in enumerate(zip(clean, corrupted)) if a != b][0]
    child(window, "pairCombo", QComboBox).setCurrentIndex(3)  # pair 2
    window.predictions = None
    view.cell_clicked.emit((1, position), float(view.image_data()[1, position]))
    qtbot.waitUntil(lambda: window.predictions is not None, timeout=30_000)
    ids, probs = _reference_top5(ioi_gpt2_dir, clean, corrupted, 1, position)
    rows = window.predictions.rows["patched"]
    np.testing.assert_allclose([p for _, p in rows], probs, atol=1e-5)
    shown = [t for t, _ in rows]
    assert shown[0].strip() in tok.decode([ids[0]]) or tok.decode([ids[0]]).strip() in shown[0]
    assert "pair 2" in label.text() and "answer" in label.text()
    # pair 0's patched run at the same cell is another run: the test can tell the pairs apart
    _, probs0 = _reference_top5(ioi_gpt2_dir, [int(i) for i in dataset_result.tokens_clean[0] if i >= 0],
                                [int(i) for i in dataset_result.tokens_corrupted[0] if i >= 0], 1, position)
    assert not np.allclose(probs0, probs, atol=1e-4)


def test_a_picked_pair_of_a_result_of_another_model_computes_nothing(qtbot, window, dataset_result, gpt2_dir):
    from desktop_app.ui import worker_jobs

    load_model(qtbot, window, gpt2_dir)  # another model: the result's token ids are not its ids
    qtbot.waitUntil(lambda: getattr(window.session.loaded, "path", None) == str(gpt2_dir), timeout=60_000)
    calls = []
    real = worker_jobs.top_predictions
    worker_jobs.top_predictions = lambda *a, **k: calls.append(a) or real(*a, **k)
    try:
        view = child(window, "heatmapView")
        child(window, "pairCombo", QComboBox).setCurrentIndex(3)
        window.predictions = None
        view.cell_clicked.emit((1, 2), float(view.image_data()[1, 2]))
        label = child(window, "cellPredictionsLabel").text()
        assert calls == [] and window.predictions is None and "Re-run it" in label
    finally:
        worker_jobs.top_predictions = real
