"""Every training kind shows live curves in the training dock however it starts: the Analysis panel's Run (here),
a re-run from the Analyses list and Run all, as the SAE menu's Train SAE… / Train transcoders… do
(test_window_sae.py, test_window_transcoder_training.py); Stop or the panel's Cancel keeps what was trained so
far, loadable, and says the folder."""
import json

import pytest
from PySide6.QtCore import Qt

from desktop_app import demo_task
from ui_helpers import load_model, type_prompts

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def ready(qtbot, window, ioi_gpt2_dir, tmp_path):
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    type_prompts(window)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(60, seed=4)), encoding="utf-8")
    return window, corpus


def _panel_run(qtbot, window, kind, **fields):
    panel = window.analysis_panel
    panel.set_kind(kind)
    for name, value in fields.items():
        panel.set_field(name, value)
    qtbot.mouseClick(panel.run_button, Qt.LeftButton)
    assert window.analysis_ctl.run_job is not None, window.message_bar.text()


def _plotted(curve) -> int:
    xs = curve.getData()[0]
    return 0 if xs is None else len(xs)


def _running(window) -> bool:
    return window.analysis_ctl.run_job is not None


def test_transcoder_training_from_the_analysis_panel_is_live_and_cancel_keeps_a_set(qtbot, ready, tmp_path):
    from desktop_app.engine.transcoders import load_transcoder_set

    window, corpus = ready
    out = tmp_path / "panel set"
    _panel_run(qtbot, window, "transcoder_training", corpus=str(corpus), out=str(out), architecture="topk",
               width=16, k=4, steps=1_000_000, batch_size=32, buffer_tokens=256, context=32)
    view, dock = window.training_view, window.docks["trainDock"]
    assert dock.isVisible() and dock.windowTitle() == "Transcoder training"
    assert "transcoders" in view.status_label.text() and view.cancel_button.isEnabled()
    # live: the plotted curve of each layer grows while the run goes on
    qtbot.waitUntil(lambda: view.layer_curves.get(1) is not None and _plotted(view.layer_curves[1]["loss"]) >= 2,
                    timeout=120_000)
    seen = _plotted(view.layer_curves[1]["loss"])
    qtbot.waitUntil(lambda: _plotted(view.layer_curves[1]["loss"]) > seen, timeout=60_000)
    assert _running(window) and sorted(view.layer_curves) == [0, 1]
    qtbot.mouseClick(window.analysis_panel.cancel_button, Qt.LeftButton)  # the panel's Cancel, not the dock's Stop
    qtbot.waitUntil(lambda: not view.cancel_button.isEnabled(), timeout=60_000)
    assert not _running(window)
    assert f"saved in {out}" in view.status_label.text(), view.status_label.text()
    assert f"saved in {out}" in window.message_bar.text() and window.message_bar.level == "warning"
    result = window.project.entry(window.session.selected).result
    assert result.kind == "transcoder_training" and result.status == "partial"
    info = json.loads((out / "training.json").read_text())
    assert info["cancelled"] is True and info["steps_done"] == result.params["steps_done"] > 0
    assert f"cancelled after {info['steps_done']} steps" in view.status_label.text()
    tset = load_transcoder_set(out, n_layers=2, d_model=64)
    assert tset.layers[0].activation == "topk" and tset.layers[1].k == 4


def test_sae_training_from_the_analysis_panel_is_live_and_stop_keeps_the_sae(qtbot, ready, tmp_path):
    from desktop_app.engine.sae.formats import load_sae

    window, corpus = ready
    out = tmp_path / "panel sae"
    _panel_run(qtbot, window, "sae_training", corpus=str(corpus), out=str(out), hook=HOOK, architecture="topk",
               width=16, k=4, steps=1_000_000, batch_size=32, cache=False)
    view, dock = window.training_view, window.docks["trainDock"]
    assert dock.isVisible() and dock.windowTitle() == "SAE training"
    qtbot.waitUntil(lambda: _plotted(view.curves["loss"]) >= 2, timeout=120_000)
    seen = _plotted(view.curves["explained_variance"])
    qtbot.waitUntil(lambda: _plotted(view.curves["explained_variance"]) > seen, timeout=60_000)
    assert _running(window) and view.layer_curves == {}
    qtbot.mouseClick(view.cancel_button, Qt.LeftButton)  # the dock's Stop
    qtbot.waitUntil(lambda: not view.cancel_button.isEnabled(), timeout=60_000)
    result = window.project.entry(window.session.selected).result
    assert result.kind == "sae_training" and result.status == "partial"
    steps = result.params["steps_done"]
    assert 0 < steps < 1_000_000
    text = view.status_label.text()
    assert f"cancelled after {steps} steps" in text and f"saved in {out}" in text, text
    assert f"saved in {out}" in window.message_bar.text()
    checkpoint = result.params["checkpoint"]
    assert checkpoint and checkpoint in text and checkpoint.startswith(str(out))
    sae = load_sae(out)
    assert sae.d_sae == 16 and sae.d_in == 64


def test_a_rerun_from_the_analyses_list_and_run_all_refill_the_curves(qtbot, ready, tmp_path):
    window, corpus = ready
    out = tmp_path / "rerun"
    with qtbot.waitSignal(window.analysis_ended, timeout=120_000):  # emitted just after the run ended
        _panel_run(qtbot, window, "transcoder_training", corpus=str(corpus), out=str(out), architecture="topk",
                   width=8, k=2, steps=20, batch_size=32, buffer_tokens=256, context=32)
    view = window.training_view
    assert view.layer_steps[1][-1] == 20 and f"saved in {out}" in view.status_label.text()
    name = window.session.selected

    updates = []
    add = view.add_metrics
    view.add_metrics = lambda m: (updates.append((m.step, _running(window))), add(m))
    window.analysis_ctl.run_named(name)  # the Analyses list's Run
    assert view.layer_steps == {} and view.cancel_button.isEnabled()  # the curves start over
    qtbot.waitUntil(lambda: not _running(window), timeout=120_000)
    assert updates and all(running for _step, running in updates)  # every point arrived before the run ended
    assert view.layer_steps[0][-1] == 20 and _plotted(view.layer_curves[0]["loss"]) == len(view.layer_steps[0])
    assert "trained 20 steps" in window.message_bar.text()

    window.project.set_result(name, None)  # nothing stored: Run all runs it
    updates.clear()
    window.analysis_ctl.run_all()
    assert _running(window) and view.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: not _running(window), timeout=120_000)
    assert updates and all(running for _step, running in updates)
    assert view.layer_steps[1][-1] == 20 and "saved in" in view.status_label.text()


def test_other_kinds_leave_the_training_view_alone(qtbot, ready):
    window, _corpus = ready
    view = window.training_view
    before = view.status_label.text()
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        _panel_run(qtbot, window, "activation_patching")
    assert view.status_label.text() == before and not window.docks["trainDock"].isVisible()
    assert window.analysis_ctl.training.kind is None
