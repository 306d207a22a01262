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
