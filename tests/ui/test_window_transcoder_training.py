"""Transcoder training in the real window: SAE > Train transcoders… runs a transcoder_training analysis whose
curves (one per layer) fill in live; Stop keeps the transcoders so far as a set that loads, and says where."""
import json

import pytest

from desktop_app import demo_task
from ui_helpers import child, load_model, type_prompts


@pytest.fixture
def ready(qtbot, window, ioi_gpt2_dir, tmp_path):
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    type_prompts(window)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(60, seed=4)), encoding="utf-8")
    return window, corpus


def test_training_fills_curves_per_layer_and_writes_a_set(qtbot, ready, tmp_path):
    from desktop_app.engine.transcoders import load_transcoder_set

    window, corpus = ready
    assert child(window, "actionTrainTranscoders", cls=type(window.act_train_transcoders)) is not None
    out = tmp_path / "set"
    job = window.train_transcoders(corpus, out, architecture="topk", width=16, k=4, steps=40, batch_size=64,
                                   buffer_tokens=512, context=32)
    assert job is not None
    view = window.training_view
    assert window.docks["trainDock"].windowTitle() == "Transcoder training"
    qtbot.waitUntil(lambda: not view.cancel_button.isEnabled(), timeout=120_000)
    assert sorted(view.layer_steps) == [0, 1], view.status_label.text()
    for layer in (0, 1):
        assert view.layer_steps[layer][-1] == 40 and len(view.layer_steps[layer]) >= 5
        xs, ys = view.layer_curves[layer]["explained_variance"].getData()
        assert list(xs) == view.layer_steps[layer] and ys.size == len(xs)
    assert view.steps == []  # the SAE's single curve stays empty
    tset = load_transcoder_set(out, n_layers=2, d_model=64)
    assert tset.layers[0].activation == "topk" and tset.layers[0].k == 4
    assert f"saved in {out}" in view.status_label.text() and "saved in" in window.message_bar.text()
    entry = window.project.entry("transcoder training")
    assert entry.spec.kind == "transcoder_training" and entry.result.dims == ["layer", "step"]


def test_stop_keeps_the_transcoders_so_far_and_says_where(qtbot, ready, tmp_path):
    from desktop_app.engine.transcoders import load_transcoder_set

    window, corpus = ready
    out = tmp_path / "stopped"
    window.train_transcoders(corpus, out, architecture="jumprelu", width=16, l0=0.1, steps=1_000_000,
                             batch_size=32, buffer_tokens=256, context=32)
    view = window.training_view
    # live: curve points arrive while the run goes on
    qtbot.waitUntil(lambda: len(view.layer_steps.get(1, [])) >= 3, timeout=120_000)
    qtbot.waitUntil(lambda: view.layer_curves.get(1) is not None
                    and view.layer_curves[1]["loss"].getData()[0] is not None
                    and len(view.layer_curves[1]["loss"].getData()[0]) >= 3, timeout=10_000)
    assert view.cancel_button.isEnabled()
    view.cancel_button.click()
    qtbot.waitUntil(lambda: not view.cancel_button.isEnabled() and "saved in" in view.status_label.text(),
                    timeout=60_000)
    assert str(out) in view.status_label.text() and str(out) in window.message_bar.text()
    tset = load_transcoder_set(out, n_layers=2, d_model=64)
    assert tset.layers[1].activation == "jumprelu"
    info = json.loads((out / "training.json").read_text())
    result = window.project.entry("transcoder training").result
    assert info["cancelled"] is True and info["steps_done"] == result.params["steps_done"] < 1_000_000
    assert result.status == "partial"


def test_bad_layers_are_one_sentence(qtbot, ready, tmp_path):
    window, corpus = ready
    assert window.train_transcoders(corpus, tmp_path / "x", layers="one, two") is None
    text = window.message_bar.text()
    assert "layer numbers" in text and "\n" not in text
    assert window.train_transcoders(corpus, tmp_path / "x", layers="7", steps=2) is not None
    qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=60_000)
    assert "do not exist" in window.message_bar.text() and "\n" not in window.message_bar.text()
    qtbot.waitUntil(lambda: not window.training_view.cancel_button.isEnabled(), timeout=10_000)


def test_the_dialog_gives_the_settings(qtbot, tmp_path):
    from desktop_app.ui.transcoder_trainer import TranscoderTrainDialog, parse_layers

    dialog = TranscoderTrainDialog(str(tmp_path))
    qtbot.addWidget(dialog)
    dialog.corpus_edit.setText("c.txt")
    dialog.out_edit.setText(str(tmp_path / "o"))
    dialog.arch_combo.setCurrentText("jumprelu")
    dialog.layers_edit.setText("0, 1")
    dialog.skip_check.setChecked(True)
    s = dialog.settings()
    assert s["architecture"] == "jumprelu" and s["skip"] is True and parse_layers(s["layers"]) == (0, 1)
    assert parse_layers("") is None and parse_layers("all") is None


def test_the_dialog_stays_open_with_what_was_typed_until_the_settings_are_usable(qtbot, tmp_path):
    from desktop_app.ui.transcoder_trainer import TranscoderTrainDialog

    dialog = TranscoderTrainDialog(str(tmp_path))
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.corpus_edit.setText("c.txt")
    dialog.out_edit.setText(str(tmp_path / "o"))
    dialog.layers_edit.setText("0, two")
    dialog.accept()
    assert dialog.isVisible() and dialog.result() != dialog.DialogCode.Accepted
    assert "layer numbers" in dialog.problem_label.text() and "'0, two'" in dialog.problem_label.text()
    assert dialog.layers_edit.text() == "0, two" and dialog.corpus_edit.text() == "c.txt"
    dialog.layers_edit.setText("0, 2")
    dialog.out_edit.setText("")
    dialog.accept()
    assert dialog.isVisible() and "output folder" in dialog.problem_label.text()
    dialog.out_edit.setText(str(tmp_path / "o"))
    dialog.accept()
    assert not dialog.isVisible() and dialog.result() == dialog.DialogCode.Accepted
