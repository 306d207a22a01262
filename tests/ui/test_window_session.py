"""The window never mixes models, never loses work, and lists every analysis: driven by object name."""
import time

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QMessageBox, QProgressBar

from desktop_app.project.iwb import load_project
from desktop_app.ui import worker_jobs

from ui_helpers import child, load_model, type_prompts


def _slow_chunks(monkeypatch, seconds):
    from desktop_app.engine import patching

    real = patching._chunk_logits

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)
    monkeypatch.setattr(patching, "_chunk_logits", slow)


def _run(qtbot, window, component="resid_pre", metric=None):
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("activation_patching"))
    child(window, "componentCombo", QComboBox).setCurrentText(component)
    if metric:
        child(window, "metricCombo", QComboBox).setCurrentText(metric)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
        qtbot.mouseClick(child(window, "runButton"), Qt.LeftButton)
    return ended.args[0]


def _load_other(qtbot, window, path):
    child(window, "modelPathEdit").setText(str(path))
    qtbot.mouseClick(child(window, "loadModelButton"), Qt.LeftButton)
    qtbot.waitUntil(lambda: (window.loaded_ref is not None and window.loaded_ref.path == str(path))
                    or window.message_bar.level == "error", timeout=60_000)


@pytest.fixture
def no_predictions(monkeypatch):
    """Fails the test if a clicked cell submits a predictions job."""
    calls = []
    monkeypatch.setattr(worker_jobs, "top_predictions", lambda *a, **k: calls.append(a) or (lambda s, c: None))
    return calls


def test_results_of_another_model_are_stale_and_a_click_does_not_compute(qtbot, window, ioi_gpt2_dir, gpt2_dir,
                                                                         no_predictions):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    assert _run(qtbot, window) == "done"
    view = child(window, "heatmapView")
    result = window.current_result()
    values = result.values.copy()
    assert not view.is_stale() and not child(window, "staleLabel").isVisible()
    assert window.project.analyses[0].result_model["path"] == str(ioi_gpt2_dir)

    _load_other(qtbot, window, gpt2_dir)
    assert window.model_loaded is not None and window.loaded_ref.path == str(gpt2_dir)
    qtbot.waitUntil(view.is_stale, timeout=5000)
    assert child(window, "staleLabel").isVisible() and "another model" in child(window, "staleLabel").text()
    assert view.result is result and np.array_equal(result.values, values, equal_nan=True)
    assert child(window, "analysisList").item(0).text().startswith("⚠ stale")

    view.cell_clicked.emit((0, 0), float(values[0, 0]))
    assert no_predictions == []
    assert window.message_bar.level == "warning" and "re-run" in window.message_bar.text().lower()
    action = child(window, "messageActionButton")
    assert action.isVisible() and action.text() == "Re-run"
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        qtbot.mouseClick(action, Qt.LeftButton)
    assert not view.is_stale() and window.project.analyses[0].result_model["path"] == str(gpt2_dir)
    assert "stale" not in child(window, "analysisList").item(0).text()


def test_a_failed_load_keeps_the_loaded_model(qtbot, window, ioi_gpt2_dir, tmp_path):
    load_model(qtbot, window, ioi_gpt2_dir)
    loaded = window.model_loaded
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all" * 10)
    for bad in (tmp_path / "no-such-model", fake):
        window.message_bar.clear()
        child(window, "modelPathEdit").setText(str(bad))
        qtbot.mouseClick(child(window, "loadModelButton"), Qt.LeftButton)
        qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=60_000)
        text = window.message_bar.text()
        assert "still loaded" in text and str(ioi_gpt2_dir) in text, text
        assert window.model_loaded is loaded and window.session.loaded.path == str(ioi_gpt2_dir)
        assert child(window, "modelPathEdit").text() == str(ioi_gpt2_dir)
    type_prompts(window)
    assert _run(qtbot, window) == "done"  # the kept model still computes
    assert window.current_result().status == "complete"


def test_close_mid_run_with_save_keeps_partial_cells(qtbot, window, ioi_gpt2_dir, tmp_path, monkeypatch):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    assert window.save_to(tmp_path / "p.iwb")
    _slow_chunks(monkeypatch, 0.1)
    child(window, "batchSizeSpin").setValue(1)
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("activation_patching"))
    qtbot.mouseClick(child(window, "runButton"), Qt.LeftButton)
    bar = child(window, "progressBar", QProgressBar)
    qtbot.waitUntil(lambda: bar.value() >= 3, timeout=30_000)
    asked = []
    monkeypatch.setattr(QMessageBox, "question", lambda *a, **k: asked.append(a[2]) or QMessageBox.Save)
    window.confirm_dialogs = True
    window.close()
    assert asked and "still running" in asked[0]
    saved = load_project(tmp_path / "p.iwb")
    r = saved.analyses[0].result
    assert r.status == "partial"
    done = np.isfinite(r.values)
    assert 3 <= done.sum() < r.values.size


def test_every_document_edit_undoes_and_redoes(qtbot, window, ioi_gpt2_dir, gpt2_dir):
    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    stack, project, listing = window.undo_stack, window.project, window.analysis_list

    def check(edit, state):
        before = state()
        edit()
        after = state()
        assert after != before
        window.act_undo.trigger()
        assert state() == before
        window.act_redo.trigger()
        assert state() == after

    names = lambda: project.names()  # noqa: E731
    check(lambda: child(window, "cleanPromptEdit").setText("When Mary and John went home, John gave a drink to"),
          lambda: project.prompts.clean)
    check(lambda: _run(qtbot, window), names)  # add
    check(lambda: _run(qtbot, window, metric="logit_diff"), lambda: project.analyses[0].spec.metric)  # spec edit
    check(lambda: listing.rename(names()[0], "renamed"), names)
    check(lambda: listing.duplicate("renamed"), names)
    check(lambda: listing.remove("renamed copy"), names)
    check(lambda: window._hooks_checked(["blocks.0.hook_resid_pre"]), lambda: project.view("selected_hooks"))
    check(lambda: _load_other(qtbot, window, gpt2_dir), lambda: project.model.path if project.model else None)
    assert stack.can_undo()


def test_run_all_runs_empty_and_stale_analyses_in_order(qtbot, window, ioi_gpt2_dir):
    from desktop_app.project.specs import ActivationPatchingSpec, AttributionPatchingSpec
    from desktop_app.project.undo import AddAnalysis

    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    assert _run(qtbot, window) == "done"
    window.undo_stack.push(AddAnalysis(window.project, AttributionPatchingSpec("attr")))
    window.undo_stack.push(AddAnalysis(window.project, ActivationPatchingSpec("heads", component="head_out",
                                                                              positions="all")))
    first = window.project.analyses[0].result
    listing = child(window, "analysisList")
    assert listing.count() == 3 and "not run" in listing.item(1).text()
    button = child(window, "runAllButton")
    assert button.isEnabled()
    qtbot.mouseClick(button, Qt.LeftButton)
    qtbot.waitUntil(lambda: all(e.result is not None for e in window.project.analyses) and window._run_job is None,
                    timeout=60_000)
    assert window.project.analyses[0].result is first  # up to date: not run again
    assert [e.result.status for e in window.project.analyses] == ["complete"] * 3
    assert not button.isEnabled()
    listing.setCurrentRow(1)
    assert window.current_result() is window.project.entry("attr").result


def test_an_sae_with_dashboards_and_a_feature_edit_survives_save_and_reopen(qtbot, window, ioi_gpt2_dir, tmp_path):
    import torch

    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.model import SAE, SAEConfig

    hook = "blocks.1.hook_resid_pre"
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=64, d_sae=8, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    folder = save_saelens(sae, tmp_path / "sae")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("When Mary and John went to the store, John gave a drink to\n" * 4, encoding="utf-8")

    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        window.attach_sae(folder, hook)
    window.build_dashboards(corpus)
    pane = window.sae_view
    qtbot.waitUntil(lambda: len(pane.dashboards) == 8, timeout=60_000)
    shown = [d.to_dict() for d in pane.dashboards]
    pane.feature_spin.setValue(3)
    pane.mode_combo.setCurrentText("clamp")
    pane.value_spin.setValue(7.5)
    child(pane, "saeApplyButton").click()
    qtbot.waitUntil(lambda: bool(window.session.saes() and window.session.saes()[0].edits), timeout=10_000)
    assert window.save_to(tmp_path / "p.iwb")

    from desktop_app.ui import create_main_window

    other = create_main_window([])
    other.confirm_dialogs = False
    qtbot.addWidget(other)
    try:
        assert other.open_project(tmp_path / "p.iwb")
        qtbot.waitUntil(lambda: other.sae_attached is not None and len(other.sae_view.dashboards) == 8,
                        timeout=60_000)
        assert str(other.sae_attached.path) == str(folder) and other.sae_attached.hook == hook
        assert [d.to_dict() for d in other.sae_view.dashboards] == shown
        p2 = other.sae_view
        assert (p2.feature_spin.value(), p2.mode_combo.currentText(), p2.value_spin.value()) == (3, "clamp", 7.5)
        assert not other.project.dirty  # restoring is not an edit
    finally:
        other.close()
        other.runner.shutdown()


def test_errors_and_warnings_look_different_and_ctrl_e_works_in_a_text_field(qtbot, window, ioi_gpt2_dir,
                                                                             tmp_path):
    bar = window.message_bar
    window.show_error("an error")
    error_icon, error_style = bar.icon.pixmap().toImage(), bar.styleSheet()
    window.show_message("a warning", "warning")
    warning_icon, warning_style = bar.icon.pixmap().toImage(), bar.styleSheet()
    assert not error_icon.isNull() and not warning_icon.isNull()  # the icons render
    assert error_icon != warning_icon and error_style != warning_style
    assert bar.icon.toolTip() == "Warning" and bar.label.text() == "a warning"

    load_model(qtbot, window, ioi_gpt2_dir)
    type_prompts(window)
    assert _run(qtbot, window) == "done"
    from PySide6.QtCore import QEvent
    from PySide6.QtWidgets import QLineEdit

    class X11LineEdit(QLineEdit):
        """A text field as QLineEdit behaves under X11, where it claims Ctrl+E (end of line) for itself."""

        def event(self, e):
            if e.type() == QEvent.ShortcutOverride and e.key() == Qt.Key_E and e.modifiers() == Qt.ControlModifier:
                e.accept()
                return True
            return super().event(e)

    edit = X11LineEdit()
    window.prompts_panel.layout().addWidget(edit)
    edit.show()
    edit.setFocus()
    qtbot.waitUntil(edit.hasFocus, timeout=2000)
    qtbot.keyClick(edit, Qt.Key_E, Qt.ControlModifier)
    dialog = qtbot.waitUntil(lambda: getattr(window, "export_dialog", None) is not None, timeout=3000) or \
        window.export_dialog
    assert dialog.objectName() == "exportFigureDialog" and dialog.isVisible()
    for name, value in (("widthSpin", 900), ("heightSpin", 600), ("dpiSpin", 200)):
        child(dialog, name).setValue(value)
    child(dialog, "titleEdit").setText("Residual stream patching")
    child(dialog, "vminEdit").setText("-2")
    child(dialog, "vmaxEdit").setText("2")
    assert dialog.update_preview() and not child(dialog, "figurePreview").pixmap().isNull()
    assert dialog.export_to(tmp_path / "fig.svg")
    text = (tmp_path / "fig.svg").read_text()
    assert "Residual stream patching" in text and "model ioi_gpt2" in text and 'width="900' in text
    child(dialog, "vminEdit").setText("low")
    assert not dialog.update_preview() and "number" in child(dialog, "figureErrorLabel").text()
    dialog.reject()


def test_shared_colour_scale_across_results_of_the_same_value(qtbot, window):
    from desktop_app.engine.results import AnalysisResult
    from desktop_app.project.document import Project
    from desktop_app.project.specs import ActivationPatchingSpec, ModelRef

    project = Project(model=ModelRef("/m"))
    rng = np.random.default_rng(0)
    for name, scale, metric in (("small", 0.5, "logit_diff"), ("big", 4.0, "logit_diff"), ("other", 9.0, "kl_div")):
        project.add_analysis(ActivationPatchingSpec(name, metric=metric))
        values = rng.uniform(-1, 1, (3, 4)).astype(np.float32) * scale
        values[0, 0] = scale
        project.set_result(name, AnalysisResult(name, "activation_patching", {"metric": metric},
                                                ["layer", "position"], values))
    window.set_project(project)
    listing = child(window, "analysisList")
    listing.setCurrentRow(0)
    view = window.result_view
    assert view.levels() == pytest.approx((-0.5, 0.5))
    window.act_shared_scale.trigger()
    assert window.act_shared_scale.isChecked() and project.view("shared_colour_scale")
    assert view.levels() == pytest.approx((-4.0, 4.0))  # the kl_div result's 9 is another value: not shared
    window.act_undo.trigger()
    assert not window.act_shared_scale.isChecked() and view.levels() == pytest.approx((-0.5, 0.5))
