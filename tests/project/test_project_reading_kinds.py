"""The lens, attention, direct-logit-attribution and token-attribution kinds through the registry: an experiment
file runs them headless, the project file keeps their arrays, `info` and the NPZ export show them."""
import json

import numpy as np
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project import kinds
from desktop_app.project.specs import analysis_from_dict

ANALYSES = [
    {"name": "lens", "kind": "logit_lens", "target": "prediction", "k": 3},
    {"name": "patterns", "kind": "attention_patterns", "layers": [1], "heads": [0, 2]},
    {"name": "rollout", "kind": "attention_rollout", "residual": 0.4, "head_fusion": "max"},
    {"name": "flow", "kind": "attention_rollout", "method": "flow", "prompt": "Mary and John went"},
    {"name": "dla", "kind": "direct_logit_attribution", "granularity": "layers"},
    {"name": "ig", "kind": "token_attribution", "method": "integrated_gradients", "baseline": "zero", "steps": 16},
    {"name": "shap", "kind": "token_attribution", "method": "shap", "prompt": "Mary and John went to",
     "target": "answer_prob", "samples": 64},
]


def _experiment(tmp_path, model_dir, analyses=ANALYSES):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({
        "version": 1, "model": {"path": str(model_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"clean": "When Mary and John went to the store, John gave a drink to",
                    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
                    "answer": " Mary", "wrong_answer": " John"},
        "analyses": analyses}))
    return path


def test_the_new_kinds_are_registered_with_view_types_and_round_trip():
    for kind in ("logit_lens", "attention_patterns", "attention_rollout", "direct_logit_attribution",
                 "token_attribution"):
        record = kinds.get(kind)
        assert record.view in kinds.VIEW_TYPES
    for d in ANALYSES:
        spec = analysis_from_dict(d)
        assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(SpecError, match="lens_path"):
        analysis_from_dict({"name": "t", "kind": "logit_lens", "lens": "tuned"})
    with pytest.raises(SpecError, match="method"):
        analysis_from_dict({"name": "t", "kind": "token_attribution", "method": "deeplift"})


def test_an_experiment_runs_every_new_kind_and_the_project_keeps_the_arrays(gpt2_dir, tmp_path, capsys):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    out = tmp_path / "p.iwb"
    assert main(["run", str(_experiment(tmp_path, gpt2_dir)), "--out", str(out), "-q"]) == 0
    project = load_project(out)
    results = {e.name: e.result for e in project.analyses}
    assert all(r.status == "complete" for r in results.values()), {n: r.message for n, r in results.items()}
    lens = results["lens"]
    assert lens.dims == ["layer", "position"] and lens.extras["top_token_ids"].shape == lens.values.shape + (3,)
    assert lens.params["target"] == "prediction" and lens.labels["position"][0].startswith("0: ")
    assert results["patterns"].values.shape[:2] == (1, 2)
    np.testing.assert_allclose(results["rollout"].values.sum(-1), 1.0, atol=1e-5)
    assert results["flow"].values.shape == (2, 5, 5)
    dla = results["dla"]
    assert dla.labels["sublayer"] == ["attn", "mlp"]
    assert dla.values.sum() + dla.extras["embed"][0] + dla.extras["bias"][0] == pytest.approx(
        dla.extras["logit_diff"][0], abs=1e-4)
    assert "convergence_delta" in results["ig"].extras and results["ig"].extras["deletion_curve"].shape == (
        results["ig"].values.shape[0] + 1,)
    assert results["shap"].extras["shap_exact"][0] == 1

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = {a["name"]: a for a in json.loads(capsys.readouterr().out)["analyses"]}
    assert info["patterns"]["dims"] == ["layer", "head", "query", "key"]
    assert main(["export", str(out), "--analysis", "ig", "--out", str(tmp_path / "ig.npz")]) == 0
    with np.load(tmp_path / "ig.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["values"], results["ig"].values)
        assert "deletion_curve" in z.files and "convergence_delta" in z.files and "labels_position" in z.files


def test_a_tuned_lens_trained_in_an_experiment_is_read_by_a_later_analysis(llama_dir, tmp_path):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("When Mary and John went to the store, John gave a drink to Mary.\n"
                      "After Tom and Anna met at the park, Anna handed a book to Tom.\n")
    analyses = [{"name": "train", "kind": "tuned_lens_training", "corpus": str(corpus), "out": str(tmp_path / "tl"),
                 "steps": 5, "context": 16, "batch_size": 2},
                {"name": "tuned", "kind": "logit_lens", "lens": "tuned", "lens_path": str(tmp_path / "tl")}]
    out = tmp_path / "p.iwb"
    assert main(["run", str(_experiment(tmp_path, llama_dir, analyses)), "--out", str(out), "-q"]) == 0
    results = {e.name: e.result for e in load_project(out).analyses}
    assert results["train"].dims == ["step"] and np.isfinite(results["train"].values).all()
    assert results["tuned"].status == "complete" and results["tuned"].params["lens"] == "tuned"


def test_a_kind_that_cannot_run_fails_alone_with_one_sentence(gpt2_dir, tmp_path):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    analyses = [{"name": "tuned", "kind": "logit_lens", "lens": "tuned", "lens_path": str(tmp_path / "none")},
                {"name": "dla", "kind": "direct_logit_attribution"}]
    out = tmp_path / "p.iwb"
    main(["run", str(_experiment(tmp_path, gpt2_dir, analyses)), "--out", str(out), "-q"])
    results = {e.name: e.result for e in load_project(out).analyses}
    assert results["tuned"].status == "failed" and "tuned-lens folder" in results["tuned"].message
    assert results["dla"].status == "complete"


def test_a_jacobian_lens_fitted_in_an_experiment_is_read_by_a_later_analysis(gpt2_dir, tmp_path):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("When Mary and John went to the store, John gave a drink to Mary.\n"
                      "After Tom and Anna met at the park, Anna handed a book to Tom.\n")
    with pytest.raises(SpecError, match="lens_path"):
        analysis_from_dict({"name": "t", "kind": "logit_lens", "lens": "jacobian"})
    analyses = [{"name": "fit", "kind": "jacobian_lens_fitting", "corpus": str(corpus), "out": str(tmp_path / "j.pt"),
                 "skip_first": 2, "dim_batch": 16},
                {"name": "jl", "kind": "logit_lens", "lens": "jacobian", "lens_path": str(tmp_path / "j.pt"),
                 "target": "prediction"},
                {"name": "plain", "kind": "logit_lens", "target": "prediction"}]
    for d in analyses:
        spec = analysis_from_dict(d)
        assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert kinds.get("jacobian_lens_fitting").view in kinds.VIEW_TYPES
    out = tmp_path / "p.iwb"
    assert main(["run", str(_experiment(tmp_path, gpt2_dir, analyses)), "--out", str(out), "-q"]) == 0
    results = {e.name: e.result for e in load_project(out).analyses}
    assert all(r.status == "complete" for r in results.values()), {n: r.message for n, r in results.items()}
    assert results["fit"].dims == ["layer"] and results["fit"].values[-1] < 1e-6
    np.testing.assert_allclose(results["jl"].values[-1], results["plain"].values[-1], atol=1e-5)
