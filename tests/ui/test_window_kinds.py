"""Every registered kind builds its Analysis panel rows from the registry, and a spec typed into those rows runs
in the window and equals the spec an experiment file with the same fields gives."""
import dataclasses

import numpy as np
import pytest
import torch
from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QLineEdit, QPlainTextEdit, QSpinBox

from desktop_app.project import kinds
from desktop_app.project.specs import analysis_from_dict, panel_fields
from desktop_app.ui.spec_form import camel

from ui_helpers import child, load_model, type_prompts

HOOK = "blocks.1.hook_resid_pre"

# non-default values of every field; a new kind adds its entry here (fields it leaves out keep their defaults)
EXAMPLES = {
    "activation_patching": {"component": "resid_mid", "positions": "each", "direction": "noise",
                            "metric": "logit_diff", "layers": (1,)},
    "attribution_patching": {"component": "attn_out", "positions": "all", "direction": "denoise",
                             "metric": "answer_prob"},
    "causal_tracing": {"subject": "Mary", "noise": 2.0, "samples": 2, "component": "mlp_out", "window": 1,
                       "seed": 3},
    "ablation": {"component": "mlp_out", "method": "noise", "positions": "each", "metric": "logit_diff",
                 "layers": (0,), "noise": 0.5, "seed": 2, "mean_over": "positions",
                 "reference_prompts": ("a reference", "another one"), "source_prompt": "unused here"},
    "sae_features": {"sae": None, "hook": HOOK, "prompt": "corrupted", "top_k": 5},  # sae: set by the test
    "logit_lens": {"target": "prediction", "prompt": "corrupted", "k": 3},
    "attention_patterns": {"prompt": "corrupted", "layers": (1,), "heads": (0, 2)},
    "attention_rollout": {"residual": 0.3, "head_fusion": "max", "method": "flow"},
    "direct_logit_attribution": {"granularity": "layers", "prompt": "corrupted"},
    "token_attribution": {"method": "occlusion", "target": "answer_logit", "baseline": "zero", "window": 2,
                          "steps": 8, "integration": "riemann_middle", "samples": 16, "seed": 4},
    "probe": {"dataset": None, "hook": "resid_pre", "position": "mean", "test_fraction": 0.5, "seed": 1},
    "tcav": {"concept": ("Mary gave a book", "Mary gave a pen"), "random": ("John went home", "Bob went out",
                                                                           "Anna sat down", "Tom ran away"),
             "inputs": ("When Mary and John went to the store, John gave a drink to",), "target": " Mary",
             "runs": 2, "seed": 1},
    "steering_vector": {"positive": ("Mary went home", "Mary sat down"), "negative": ("John went home",
                                                                                      "John sat down"),
                        "method": "pca", "hook": "resid_pre"},
    "steering": {"vector": None, "coefficient": 2.0, "prompt": "corrupted", "n_continue": 2},  # vector: by the test
    # sae / corpus / out: set by the test
    "sae_training": {"corpus": None, "out": None, "hook": HOOK, "architecture": "batchtopk", "width": 16, "k": 2,
                     "steps": 12, "batch_size": 32, "tokens": 400, "seed": 1},
    "sae_dashboards": {"sae": None, "corpus": None, "top_n": 4, "n_top": 2, "window": 1, "tokens": 300},
    "sae_edit": {"sae": None, "edits": ('{"feature": 1, "op": "clamp", "value": 3.0, "positions": null}',),
                 "prompt": "corrupted", "n_continue": 2, "top_n": 4},
    "sae_metrics": {"sae": None, "corpus": None, "max_texts": 3},
}


def _random_sae(folder):
    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.model import SAE, SAEConfig

    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=64, d_sae=16, hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return save_saelens(sae, folder)


def _widget_name(f):
    return camel(f.name) + {"choice": "Combo", "int": "Spin", "float": "Spin", "bool": "Check"}.get(
        f.metadata["widget"], "Edit")


def _type(widget, value):
    if isinstance(widget, QComboBox):
        widget.setCurrentText(str(value))
    elif isinstance(widget, (QSpinBox, QDoubleSpinBox)):
        widget.setValue(value)
    elif isinstance(widget, QCheckBox):
        widget.setChecked(bool(value))
    elif isinstance(widget, QPlainTextEdit):
        widget.setPlainText("\n".join(value))
    elif isinstance(widget, QLineEdit):
        widget.setText(", ".join(map(str, value)) if isinstance(value, tuple) else ("" if value is None else str(value)))
    else:
        raise AssertionError(f"no way to type into {widget!r}")


@pytest.mark.parametrize("record", kinds.all_kinds(), ids=lambda r: r.kind)
def test_panel_rows_come_from_the_registry(window, record):
    panel = window.analysis_panel
    child(window, "analysisKindCombo", QComboBox).setCurrentIndex(panel.kind_combo.findData(record.kind))
    assert panel.kind() == record.kind
    for f in panel_fields(record.spec):
        widget = child(window, _widget_name(f))
        assert widget.isVisibleTo(window), f.name
        assert widget.toolTip() == f.metadata["tip"]
        if f.metadata["widget"] == "choice":
            items = [widget.itemText(i) for i in range(widget.count())]
            assert items == [str(c) for c in f.metadata["choices"]]
    own = {_widget_name(f) for f in panel_fields(record.spec)}
    for other in kinds.all_kinds():
        for f in panel_fields(other.spec):
            if _widget_name(f) not in own:
                assert not child(window, _widget_name(f)).isVisibleTo(window), (record.kind, f.name)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_each_kind_runs_from_the_panel(qtbot, window, ioi_gpt2_dir, tmp_path, kind):
    record = kinds.get(kind)
    values = dict(EXAMPLES[kind])
    if "sae" in values:
        values["sae"] = str(_random_sae(tmp_path / "sae"))
    if kind == "steering":
        from desktop_app.engine.control_vector import write_control_vector
        values["vector"] = str(write_control_vector(tmp_path / "cv.gguf", {1: np.ones(64, np.float32)}, "gpt2"))
    if kind == "probe":
        (tmp_path / "labels.csv").write_text("text,label\n" + "\n".join(
            f"{n} went to the {p},{n == 'Mary'}" for n in ("Mary", "John") for p in ("park", "store", "school")))
        values["dataset"] = str(tmp_path / "labels.csv")
    if "corpus" in values:
        from desktop_app import demo_task
        (tmp_path / "corpus.txt").write_text("\n".join(demo_task.corpus(20, seed=1)))
        values["corpus"] = str(tmp_path / "corpus.txt")
    if "out" in values:
        values["out"] = str(tmp_path / "trained")
    load_model(qtbot, window, ioi_gpt2_dir)
    assert window.model_loaded is not None, window.message_bar.text()
    type_prompts(window)
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData(kind))
    for f in panel_fields(record.spec):
        if f.name in values:
            _type(child(window, _widget_name(f)), values[f.name])
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
        child(window, "runButton").click()
    assert ended.args == ["done"], window.message_bar.text()
    entry = window.project.analyses[-1]
    expected = analysis_from_dict({"name": entry.name, "kind": kind, **{k: list(v) if isinstance(v, tuple) else v
                                                                        for k, v in values.items()}})
    assert entry.spec == expected
    result = entry.result
    assert result.status == "complete", result.message
    assert result.kind == kind and np.isfinite(result.values).any()
    assert window.result_view.result is result
    params = {k: v for k, v in expected.to_dict().items() if k not in ("name", "kind")}
    assert {k: result.params.get(k) for k in ("component", "metric") if k in params} == \
        {k: params[k] for k in ("component", "metric") if k in params and k in result.params}
    assert dataclasses.replace(expected, name="x") == dataclasses.replace(window.spec_from_panel(), name="x")


def test_a_result_with_more_than_two_dims_shows_one_slice_chosen_by_name(qtbot, window):
    """[layer, head, query, key] (attention patterns) is drawn as query x key of the chosen layer and head."""
    from desktop_app.engine.results import AnalysisResult

    values = np.random.default_rng(0).uniform(0, 1, (2, 3, 4, 4)).astype(np.float32)
    result = AnalysisResult("att", "activation_patching", {}, ["layer", "head", "query", "key"], values,
                            {"layer": [0, 1], "query": [f"{i}: t{i}" for i in range(4)],
                             "key": [f"{i}: t{i}" for i in range(4)]})
    view = window.result_view
    view.set_result(result)
    np.testing.assert_array_equal(view.image_data(), values[0, 0])
    child(window, "layerSliceCombo", QComboBox).setCurrentIndex(1)
    child(window, "headSliceCombo", QComboBox).setCurrentIndex(2)
    np.testing.assert_array_equal(view.image_data(), values[1, 2])
    assert view.cell_coordinates((3, 1)) == {"query": 3, "key": 1, "layer": 1, "head": 2}
    assert [t for _, t in view.column_labels()] == [f"{i}: t{i}" for i in range(4)]
    view.set_result(None)
    assert window.findChild(QComboBox, "layerSliceCombo") is None or \
        not window.findChild(QComboBox, "layerSliceCombo").isVisibleTo(window)
