"""SAEs in the real window: attach one to a hook point (features in the pane equal the engine's and a numpy
encode), a width mismatch, a feature edit, dashboards, training with live curves; and a clicked heatmap cell's
top next tokens of the clean, corrupted and patched runs."""
import numpy as np
import pytest
import torch
from PySide6.QtWidgets import QLabel

from ui_helpers import IOI, child, load_model, type_prompts

HOOK = "blocks.1.hook_resid_pre"
D_MODEL = 64  # ioi_gpt2_dir


def _random_sae(folder, d_in=D_MODEL, d_sae=32, seed=0, hook=HOOK):
    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.model import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_saelens(sae, folder)


@pytest.fixture(scope="module")
def lm(ioi_gpt2_dir):
    from desktop_app.engine.loading import load_model as load

    return load(str(ioi_gpt2_dir), dtype="float32", device="cpu")


@pytest.fixture
def ready(qtbot, window, ioi_gpt2_dir):
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    type_prompts(window)
    return window


def _attach(qtbot, window, path, hook=HOOK):
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        window.attach_sae(path, hook)


def _numpy_features(lm, folder, text):
    """relu((x - b_dec) W_enc + b_enc) of the saved weights at HOOK, [position, feature]."""
    from safetensors.numpy import load_file

    from desktop_app.engine.capture import run_with_cache

    _, cache = run_with_cache(lm, [lm.tokenize(text).ids], [HOOK])
    x = cache[HOOK][0].numpy().astype(np.float64)
    w = load_file(str(folder / "sae_weights.safetensors"))
    return np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)


def test_attach_shows_features_and_a_bad_width_is_one_error(qtbot, ready, lm, tmp_path):
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.sae.jobs import sae_features_job

    window = ready
    bad = _random_sae(tmp_path / "narrow", d_in=48)
    window.attach_sae(bad, HOOK)
    qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=30_000)
    text = window.message_bar.text()
    assert "width 48" in text and "width 64" in text and "\n" not in text
    assert window.sae_attached is None

    good = _random_sae(tmp_path / "good")
    _attach(qtbot, window, good)
    assert window.sae_attached is not None and window.sae_attached.d_sae == 32
    expected = drive(sae_features_job(lm, IOI.clean, good, hook=HOOK, top_k=10))
    pane = child(window, "saeFeatureView")
    assert pane is window.sae_view and pane.isVisible()
    shown = pane.image_data()  # [feature, position]
    np.testing.assert_allclose(shown, np.nan_to_num(expected.values.T), atol=1e-5)
    assert pane._features == [int(f) for f in expected.labels["feature"]]
    reference = _numpy_features(lm, good, IOI.clean)[:, pane._features]
    np.testing.assert_allclose(shown.T[np.isfinite(expected.values)], reference[np.isfinite(expected.values)],
                               atol=1e-4)
    # also listed in the Analyses pane and selected, saved with the project
    listed = child(window, "analysisList")
    assert listed.currentItem().text().startswith(f"sae {HOOK} — SAE features — complete")
    assert window.current_result().kind == "sae_features"


def test_feature_edit_updates_the_pane(qtbot, ready, lm, tmp_path):
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.sae.jobs import sae_intervention_job

    window = ready
    folder = _random_sae(tmp_path / "sae")
    _attach(qtbot, window, folder)
    pane = window.sae_view
    feature = pane.top_features_shown()[0][0]
    pane.feature_spin.setValue(feature)
    pane.mode_combo.setCurrentText("clamp")
    pane.value_spin.setValue(25.0)
    view = child(pane, "saeInterventionView")
    view.clear()
    child(pane, "saeApplyButton").click()
    qtbot.waitUntil(lambda: "KL" in view.toPlainText(), timeout=60_000)
    expected = drive(sae_intervention_job(lm, folder, IOI.clean, [dict(feature=feature, mode="clamp", value=25.0)],
                                          keep_error=True, n_continue=10, hook=HOOK))
    text = view.toPlainText()
    for which in range(2):
        assert f"{expected.values[which, 0]:.3f}" in text
    assert f"{float(expected.extras['kl']):.4g}" in text
    assert pane.tabs.currentIndex() == 2
    # an sae_edit analysis of the project (the registry's kind), which an exported experiment repeats
    entry = window.project.entry(f"sae edit {HOOK}")
    assert entry.spec.kind == "sae_edit" and entry.result.dims == ["position", "vocab_top_k"]
    assert entry.spec.edit_list() == [{"feature": feature, "op": "clamp", "value": 25.0, "positions": None}]
    np.testing.assert_allclose(entry.result.extras["last_probs"], expected.values, atol=1e-6)


def test_dashboards_and_training(qtbot, ready, tmp_path):
    window = ready
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([IOI.clean, IOI.corrupted, "When John and Mary went to the park, Mary gave a ball to",
                                 "When Mary and John went to the shop, John gave a book to"] * 4), encoding="utf-8")
    folder = _random_sae(tmp_path / "sae")
    _attach(qtbot, window, folder)
    window.build_dashboards(corpus)
    pane = window.sae_view
    qtbot.waitUntil(lambda: len(pane.dashboards) == 32, timeout=60_000)
    assert pane.tabs.currentIndex() == 1 and pane.feature_list.count() > 0

    out = tmp_path / "trained"
    job = window.train_sae(HOOK, corpus, out, architecture="topk", width=16, k=4, steps=60, log_every=10,
                           batch_size=64)
    assert job is not None
    view = window.training_view
    qtbot.waitUntil(lambda: not view.cancel_button.isEnabled(), timeout=120_000)
    assert view.steps[-1] == 60 and len(view.history["loss"]) == len(view.steps) >= 6
    assert (out / "cfg.json").is_file(), view.status_label.text()
    assert view.curves["explained_variance"].getData()[1].size == len(view.steps)
    assert "saved" in window.message_bar.text()


def test_the_sae_pane_creates_analyses_of_the_kinds_that_an_exported_experiment_repeats(qtbot, ready, tmp_path):
    """Dashboards, metrics and training from the SAE pane are analyses of the registry's kinds in the project
    (undoable), and File > Export experiment writes them so that `interp-workbench run` repeats them."""
    import json

    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    window = ready
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([IOI.clean, IOI.corrupted, "When Mary and John went to the shop, John gave a book to"]
                                * 3), encoding="utf-8")
    folder = _random_sae(tmp_path / "sae", d_sae=16)
    _attach(qtbot, window, folder)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        window.build_dashboards(corpus)
    assert len(window.sae_view.dashboards) == 16  # the pane still shows them
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        window.build_metrics(corpus, max_texts=4)
    with qtbot.waitSignal(window.analysis_ended, timeout=120_000):
        window.train_sae(HOOK, corpus, tmp_path / "trained", architecture="topk", width=8, k=2, steps=20,
                         batch_size=32)
    assert (tmp_path / "trained" / "cfg.json").is_file()
    assert len(window.training_view.steps) >= 2
    kinds = {e.spec.kind: e for e in window.project.analyses}
    for kind in ("sae_dashboards", "sae_metrics", "sae_training"):
        assert kind in kinds and kinds[kind].result.status == "complete", kind
    assert kinds["sae_dashboards"].result.labels["feature"] == [str(d.feature) for d in window.sae_view.dashboards]
    assert kinds["sae_training"].spec.hook == HOOK and kinds["sae_metrics"].spec.sae == str(folder)

    names = window.project.names()
    window.session.undo.undo()  # the training analysis was one undoable add
    assert "sae training " + HOOK not in window.project.names() and len(window.project.names()) == len(names) - 1
    window.session.undo.redo()
    assert window.project.names() == names

    exp = tmp_path / "exported" / "exp.json"
    exp.parent.mkdir()
    assert window.export_experiment(exp)
    written = json.loads(exp.read_text())["analyses"]
    assert {"sae_dashboards", "sae_metrics", "sae_training"} <= {a["kind"] for a in written}
    assert main(["run", str(exp), "--out", str(tmp_path / "again.iwb"), "-q"]) == 0
    again = load_project(tmp_path / "again.iwb")
    ours = window.project.entry(f"sae metrics {HOOK}").result
    theirs = again.entry(f"sae metrics {HOOK}").result
    np.testing.assert_allclose(theirs.values, ours.values, rtol=1e-5, atol=1e-6)
    assert again.entry(f"sae dashboards {HOOK}").result.labels == kinds["sae_dashboards"].result.labels


def _run_sweep(qtbot, window):
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        child(window, "runButton").click()
    return window.current_result()


def _direct_top5(lm, text):
    from desktop_app.engine.capture import as_ids, forward_logits

    probs = torch.softmax(forward_logits(lm, as_ids(lm.tokenize(text).ids))[0, -1].float(), -1)
    top = torch.topk(probs, 5)
    return list(zip(lm.tokens_of_ids(top.indices.tolist()).display, top.values.tolist()))


def _same(rows, expected):
    assert [t for t, _ in rows] == [t for t, _ in expected]
    np.testing.assert_allclose([p for _, p in rows], [p for _, p in expected], atol=1e-5)


def test_clicked_cell_shows_clean_corrupted_and_patched_predictions(qtbot, ready, lm):
    window = ready
    result = _run_sweep(qtbot, window)
    assert result.dims == ["layer", "position"]
    clean, corrupted = _direct_top5(lm, IOI.clean), _direct_top5(lm, IOI.corrupted)
    ids_c, ids_x = lm.tokenize(IOI.clean).ids, lm.tokenize(IOI.corrupted).ids
    differ = [i for i, (a, b) in enumerate(zip(ids_c, ids_x)) if a != b][0]
    label = child(window, "cellPredictionsLabel", QLabel)
    # layer 0, the only differing token: the patched corrupted run is the clean run
    window.predictions = None
    window._cell_clicked((0, differ))
    qtbot.waitUntil(lambda: window.predictions is not None, timeout=30_000)
    rows = window.predictions.rows
    _same(rows["clean"], clean)
    _same(rows["corrupted"], corrupted)
    _same(rows["patched"], clean)
    assert "patched" in label.text() and clean[0][0] in label.text()
    # a position where both prompts have the same token: patching changes nothing
    window.predictions = None
    window._cell_clicked((0, 0))
    qtbot.waitUntil(lambda: window.predictions is not None, timeout=30_000)
    _same(window.predictions.rows["patched"], corrupted)
    assert "position 0" in window.predictions.title


def test_an_sae_of_another_hook_is_refused_unless_forced(qtbot, ready, tmp_path):
    window = ready
    other = "blocks.0.hook_resid_post"
    folder = _random_sae(tmp_path / "other_hook", hook=other)
    window.attach_sae(folder, HOOK)
    qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=30_000)
    text = window.message_bar.text()
    assert f"trained on {other} but is applied to {HOOK}" in text and "\n" not in text
    assert window.sae_attached is None and not window.session.saes()

    check = child(window.sae_view, "forceHookCheck")
    check.setChecked(True)
    _attach(qtbot, window, folder)
    assert window.sae_attached is not None and window.sae_attached.force_hook
    saved = window.session.saes()
    assert len(saved) == 1 and saved[0].force_hook and saved[0].to_dict()["force_hook"] is True
    result = window.current_result()
    assert result.kind == "sae_features" and result.params.get("force_hook") is True
