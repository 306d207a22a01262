"""Metric expressions as targets (token attribution, TCAV) and the reading kinds over datasets, through the
registry and the experiment file."""
import json

import numpy as np
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.execute import run_experiment
from desktop_app.project.experiment import parse_experiment
from desktop_app.project.specs import analysis_from_dict

PROMPTS = {"clean": "When Mary and John went to the store, John gave a drink to",
           "corrupted": "When Mary and John went to the store, Mary gave a drink to",
           "answer": " Mary", "wrong_answer": " John"}


def experiment(model, prompts, analyses):
    return json.dumps({"version": 1, "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
                       "prompts": prompts, "analyses": analyses})


def test_token_attribution_target_expression_round_trips_and_runs(gpt2_dir, tmp_path):
    d = {"name": "ig", "kind": "token_attribution", "method": "grad_x_input",
         "target": {"expression": "prob(answer) / prob(wrong)"}}
    spec = analysis_from_dict(d)
    assert spec.target == "prob(answer) / prob(wrong)"
    assert spec.to_dict()["target"] == {"expression": "prob(answer) / prob(wrong)"}
    assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert analysis_from_dict({"name": "b", "kind": "token_attribution"}).to_dict()["target"] == "logit_diff"
    with pytest.raises(SpecError, match="column"):
        analysis_from_dict({**d, "target": {"expression": "prob(answer) /"}})
    with pytest.raises(SpecError, match="target"):
        analysis_from_dict({**d, "target": {"expr": "prob(answer)"}})
    plain = {"name": "ld", "kind": "token_attribution", "method": "grad_x_input"}
    written = {**plain, "name": "ld2", "target": {"expression": "logit(answer) - logit(wrong)"}}
    project = run_experiment(parse_experiment(experiment(gpt2_dir, PROMPTS, [d, plain, written]), tmp_path))
    ratio, ld, ld2 = (e.result for e in project.analyses)
    assert ratio.status == "complete", ratio.message
    assert ratio.params["target"] == "prob(answer) / prob(wrong)" and np.isfinite(ratio.values).all()
    np.testing.assert_array_equal(ld.values, ld2.values)


IOI = [dict(clean="When Mary and John went to the store, John gave a drink to",
            corrupted="When Mary and John went to the store, Mary gave a drink to", answer=" Mary",
            wrong_answer=" John"),
       dict(clean="When Alice and Bob went to the park, Bob gave a book to",
            corrupted="When Alice and Bob went to the park, Alice gave a book to", answer=" Alice",
            wrong_answer=" Bob")]


def test_reading_kinds_run_over_a_dataset_through_the_registry(gpt2_dir, tmp_path):
    from desktop_app.project import kinds
    from desktop_app.project.iwb import load_project, save_project

    from iwb_testkit import assert_projects_equal

    analyses = [{"name": "dla", "kind": "direct_logit_attribution"},
                {"name": "lens", "kind": "logit_lens", "k": 2},
                {"name": "ta", "kind": "token_attribution", "method": "grad_x_input",
                 "target": {"expression": "logprob(answer) - logprob(wrong)"}}]
    exp = parse_experiment(experiment(gpt2_dir, IOI, analyses), tmp_path)
    assert all(kinds.get(a.kind).dataset_job is not None for a in exp.analyses)
    project = run_experiment(exp)
    for entry in project.analyses:
        r = entry.result
        assert r.status == "complete", (r.name, r.message)
        per_pair = r.extras["values_per_pair"]
        assert per_pair.shape == (2,) + r.values.shape and r.params["pairs"] == 2
        np.testing.assert_allclose(np.nanmean(per_pair, 0), r.values, atol=1e-5)
    dla = project.analyses[0].result
    assert dla.extras["embed_per_pair"].shape == (2, 1)
    saved = save_project(project, tmp_path / "p.iwb")
    assert_projects_equal(project, load_project(saved))
    bad = parse_experiment(experiment(gpt2_dir, IOI, [{**analyses[0], "prompt": "Mary went to"}]), tmp_path)
    r = run_experiment(bad).analyses[0].result
    assert r.status == "failed" and "clean or corrupted" in r.message


def test_tcav_target_expression_round_trips_and_runs(gpt2_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    names = ["Mary", "John", "Alice", "Bob", "Sarah", "James"]
    places = ["park", "store", "school", "beach"]
    base = {"name": "t", "kind": "tcav", "concept": [f"{n} gave a book to Mary" for n in names],
            "random": [f"{n} went to the {p}" for n in names for p in places], "runs": 2}
    spec = analysis_from_dict({**base, "target": {"expression": "logprob(answer) - logprob(wrong)"}})
    assert spec.target == "logprob(answer) - logprob(wrong)"
    assert spec.to_dict()["target"] == {"expression": "logprob(answer) - logprob(wrong)"}
    assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    literal = analysis_from_dict({**base, "target": " Mary"})  # a token stays a token
    assert literal.to_dict()["target"] == " Mary"
    with pytest.raises(SpecError, match="column"):
        analysis_from_dict({**base, "target": {"expression": "logit(answer"}})
    project = run_experiment(parse_experiment(experiment(gpt2_dir, PROMPTS, [spec.to_dict()]), tmp_path))
    r = project.analyses[0].result
    assert r.status == "complete", r.message
    assert r.params["target"] == "logprob(answer) - logprob(wrong)" and r.values.shape == (2,)
