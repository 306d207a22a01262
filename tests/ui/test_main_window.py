"""The real main window driven by object name: load a model, type prompts, run a sweep, cancel, close."""
import subprocess
import sys
import time

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QLabel, QProgressBar, QPushButton, QSpinBox, QTreeWidget

from ui_helpers import IOI, child, engine_result, load_model, type_prompts


@pytest.fixture(scope="module")
def reference(ioi_gpt2_dir):
    lm, pair, result = engine_result(ioi_gpt2_dir)
    for name in (IOI.answer, IOI.wrong):
        assert lm.is_single_token(name), f"{name!r} is not one token of the fixture tokenizer"
    return pair, result


def _slow_chunks(monkeypatch, seconds):
    from desktop_app.engine import patching

    real = patching._chunk_logits

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    monkeypatch.setattr(patching, "_chunk_logits", slow)


def _run(qtbot, window, component="resid_pre", batch=0, wait=True):
    child(window, "analysisKindCombo", QComboBox).setCurrentIndex(0)
    child(window, "componentCombo", QComboBox).setCurrentText(component)
    child(window, "batchSizeSpin", QSpinBox).setValue(batch)
    if wait:
        with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
            qtbot.mouseClick(child(window, "runButton", QPushButton), Qt.LeftButton)
    else:
        qtbot.mouseClick(child(window, "runButton", QPushButton), Qt.LeftButton)


def test_sweep_heatmap_shows_the_engine_result(qtbot, window, ioi_gpt2_dir, reference):
    pair, expected = reference
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    assert "2 layers" in child(window, "modelSummaryLabel", QLabel).text()
    tree = child(window, "layerTree", QTreeWidget)
    assert tree.topLevelItemCount() == 2 + 2  # embed, 2 blocks, final norm
    type_prompts(window)
    chips = child(window, "cleanTokens", QLabel)
    qtbot.waitUntil(lambda: len(chips.tokens) == pair.n_pos, timeout=10_000)
    assert chips.tokens == pair.clean.display
    _run(qtbot, window)
    view = child(window, "heatmapView")
    shown = view.image_data()
    assert shown.shape == expected.values.shape == (2, pair.n_pos)
    np.testing.assert_allclose(shown, expected.values, atol=1e-5)
    np.testing.assert_allclose(view.image_item.image, expected.values, atol=1e-5)
    # known structure: patching the only differing token into layer 0's residual recovers exactly 1
    differ = [i for i, (a, b) in enumerate(zip(pair.clean.ids, pair.corrupted.ids)) if a != b]
    assert len(differ) == 1
    assert shown[0, differ[0]] == pytest.approx(1.0, abs=1e-4)
    lo, hi = view.levels()
    assert lo == pytest.approx(-hi) and hi >= np.nanmax(np.abs(shown)) - 1e-6
    # every token labelled with its index, "9: ·John"
    shown = view.column_labels()
    assert [j for j, _ in shown] == list(range(pair.n_pos))
    assert all(t.rstrip("…") and f"{j}: {pair.clean.display[j]}".startswith(t.rstrip("…")) for j, t in shown)
    assert view._col_labels[differ[0]].endswith("John")
    bar = child(window, "progressBar", QProgressBar)
    assert bar.value() == bar.maximum() == expected.values.size
    listed = child(window, "analysisList")
    assert listed.count() == 1 and listed.currentItem().text().startswith("resid_pre patching — Activation patching")
    assert window.project.entry(window.analysis_list.names()[0]).result.status == "complete"
    assert window.isWindowModified()


def test_cancel_mid_run_keeps_finished_cells(qtbot, window, ioi_gpt2_dir, reference, monkeypatch):
    pair, expected = reference
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    _slow_chunks(monkeypatch, 0.05)
    bar = child(window, "progressBar", QProgressBar)
    with qtbot.waitSignal(window.analysis_ended, timeout=30_000):
        _run(qtbot, window, batch=1, wait=False)
        qtbot.waitUntil(lambda: bar.value() >= 4, timeout=20_000)
        qtbot.mouseClick(child(window, "cancelButton", QPushButton), Qt.LeftButton)
    result = window.current_result()
    assert result.status == "partial"
    done = np.isfinite(result.values)
    assert 4 <= done.sum() < result.values.size
    np.testing.assert_allclose(result.values[done], expected.values[done], atol=1e-5)
    qtbot.waitUntil(lambda: np.array_equal(np.isfinite(window.result_view.image_data()), done), timeout=2000)
    assert "cancelled" in window.message_bar.text() and window.message_bar.isVisible()
    assert child(window, "runButton", QPushButton).isEnabled()


def test_bad_path_shows_an_error_then_a_good_path_loads(qtbot, window, tmp_path, ioi_gpt2_dir):
    load_model(qtbot, window, tmp_path / "no-such-model")
    assert window.model_loaded is None
    assert window.message_bar.isVisible() and window.message_bar.level == "error"
    assert "no-such-model" in window.message_bar.text()
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None
    assert not window.message_bar.isVisible()


def test_closing_during_a_run_does_not_hang(qtbot, window, ioi_gpt2_dir, monkeypatch):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    _slow_chunks(monkeypatch, 0.2)
    bar = child(window, "progressBar", QProgressBar)
    _run(qtbot, window, batch=1, wait=False)
    qtbot.waitUntil(lambda: bar.value() >= 1, timeout=20_000)
    t0 = time.perf_counter()
    window.close()
    assert time.perf_counter() - t0 < 5
    assert window.runner.thread.isFinished()


def test_token_chips_flag_length_mismatch_and_multi_token_answer(qtbot, window, ioi_gpt2_dir):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    child(window, "corruptedPromptEdit").setText("When Mary went to the store, Mary gave a drink to")
    child(window, "answerEdit").setText(" Mary Mary")
    corrupted, answers = child(window, "corruptedTokens", QLabel), child(window, "answerTokens", QLabel)
    qtbot.waitUntil(lambda: "same length" in corrupted.text() and "2 tokens" in answers.text(), timeout=10_000)


def test_prompt_edits_undo(qtbot, window):
    edit = child(window, "cleanPromptEdit")
    edit.setText("first")
    window.undo_stack.set_clean()
    edit.setText("second")
    window.act_undo.trigger()
    assert edit.text() == "first" and window.project.prompts.clean == "first"
    window.act_redo.trigger()
    assert edit.text() == "second"


def test_ui_start_does_not_import_torch(tmp_path):
    code = ("import sys; from PySide6.QtWidgets import QApplication; app = QApplication([]);"
            "from desktop_app.ui import create_main_window; w = create_main_window([]); w.show();"
            "app.processEvents(); print('torch' in sys.modules, 'transformers' in sys.modules, flush=True);"
            "w.confirm_dialogs = False; w.close()")
    env = {"QT_QPA_PLATFORM": "offscreen", "INTERP_WORKBENCH_DATA_DIR": str(tmp_path),
           "INTERP_WORKBENCH_CONFIG_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["False", "False"], out.stderr
