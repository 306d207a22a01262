"""Datasets in the experiment file, the project file and the exports: every registered kind runs over a dataset
through the registry, and the saved project, the NPZ and the CSV carry the per-pair numbers."""
import csv
import io
import json

import numpy as np
import pytest

from desktop_app.engine.datasets import write_pair_file
from desktop_app.engine.errors import SpecError
from desktop_app.engine.templates import ioi_pairs
from desktop_app.project import kinds
from desktop_app.project.data_export import csv_text, export_npz
from desktop_app.project.dataset_prompts import DatasetPrompts, prompts_from_json
from desktop_app.project.execute import run_experiment
from desktop_app.project.experiment import parse_experiment
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.specs import ActivationPatchingSpec, analysis_from_dict

from iwb_testkit import assert_projects_equal

IOI = [dict(clean="When Mary and John went to the store, John gave a drink to",
            corrupted="When Mary and John went to the store, Mary gave a drink to", answer=" Mary",
            wrong_answer=" John"),
       dict(clean="When Alice and Bob went to the park, Bob gave a book to",
            corrupted="When Alice and Bob went to the park, Alice gave a book to", answer=" Alice",
            wrong_answer=" Bob"),
       dict(clean="When Sarah and Tom went to the store, Tom gave a drink to",
            corrupted="When Sarah and Tom went to the store, Sarah gave a drink to", answer=" Sarah",
            wrong_answer=" Tom")]


def experiment(model, prompts, analyses):
    return json.dumps({"version": 1, "model": {"path": str(model), "dtype": "float32", "device": "cpu"},
                       "prompts": prompts, "analyses": analyses})


def test_prompts_forms(tmp_path):
    assert isinstance(prompts_from_json(IOI), DatasetPrompts)
    path = write_pair_file(ioi_pairs(4, seed=0), tmp_path / "pairs.jsonl")
    data = prompts_from_json({"dataset": "pairs.jsonl"}, tmp_path)
    assert len(data) == 4 and data.source == "pairs.jsonl" and data.pairs[0].spans
    assert prompts_from_json(data.to_dict()) == data  # the form projects and saved experiments write
    assert prompts_from_json({"clean": "a"}).clean == "a"
    with pytest.raises(SpecError, match="does not exist"):
        prompts_from_json({"dataset": "missing.csv"}, tmp_path)
    with pytest.raises(SpecError, match="unknown field 'extra'"):
        prompts_from_json({"dataset": str(path), "extra": 1})


def test_metric_objects_in_specs():
    spec = analysis_from_dict({"name": "m", "kind": "activation_patching",
                               "metric": {"expression": "logit(answer) - logit(wrong)"}})
    assert spec.metric == "logit(answer) - logit(wrong)"
    assert spec.to_dict()["metric"] == {"expression": "logit(answer) - logit(wrong)"}
    assert analysis_from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match=r"analysis 'm': metric \"logit\(answer\) -\", column 16"):
        ActivationPatchingSpec("m", metric="logit(answer) -")
    with pytest.raises(SpecError, match="field 'metric' is 'logit_dif'; use one of"):
        ActivationPatchingSpec("m", metric="logit_dif")
    with pytest.raises(SpecError, match="must be one of"):
        ActivationPatchingSpec("m", metric={"expr": "x"})


ANALYSES = [
    {"name": "resid", "kind": "activation_patching", "component": "resid_pre", "positions": "each",
     "metric": "logit_diff_recovered"},
    {"name": "heads", "kind": "activation_patching", "component": "head_out", "positions": "all",
     "metric": {"expression": "logprob(answer) - logprob(wrong)"}},
    {"name": "attr", "kind": "attribution_patching", "component": "resid_pre", "metric": "logit_diff"},
    {"name": "abl", "kind": "ablation", "component": "head_out", "method": "zero", "metric": "logit_diff"},
    {"name": "trace", "kind": "causal_tracing", "subject": "went to the", "samples": 2},
]


def test_every_kind_runs_over_a_dataset_and_round_trips(gpt2_dir, tmp_path):
    exp = parse_experiment(experiment(gpt2_dir, IOI, ANALYSES), tmp_path)
    assert all(kinds.get(a.kind).dataset_job is not None for a in exp.analyses)
    project = run_experiment(exp)
    for entry in project.analyses:
        r = entry.result
        assert r.status == "complete", (r.name, r.message)
        per_pair = r.extras["values_per_pair"]
        assert per_pair.shape == (3,) + r.values.shape and r.extras["sem"].shape == r.values.shape
        assert r.extras["clean_metric"].shape == (3,) and r.tokens_clean.shape[0] == 3
        if r.name != "resid":  # not normalised: the values are the plain mean
            np.testing.assert_allclose(np.nanmean(per_pair, 0), r.values, atol=1e-5)
    assert project.analyses[1].result.params["metric"] == "logprob(answer) - logprob(wrong)"
    saved = save_project(project, tmp_path / "p.iwb")
    assert_projects_equal(project, load_project(saved))


def test_exports_carry_pairs(gpt2_dir, tmp_path):
    exp = parse_experiment(experiment(gpt2_dir, IOI[:2], ANALYSES[:1]), tmp_path)
    r = run_experiment(exp).analyses[0].result
    with np.load(export_npz(r, tmp_path / "r.npz"), allow_pickle=False) as z:
        np.testing.assert_array_equal(z["values_per_pair"], r.extras["values_per_pair"])
        np.testing.assert_array_equal(z["sem"], r.extras["sem"])
        assert z["clean_metric"].shape == (2,) and z["tokens_clean"].shape[0] == 2
    rows = list(csv.reader(io.StringIO(csv_text(r))))
    assert rows[0] == ["pair", "layer", "layer_label", "position", "position_label", "value", "sem"]
    cells = r.values.size
    assert len(rows) == 1 + 3 * cells
    assert {row[0] for row in rows[1:1 + cells]} == {"mean"} and rows[1 + cells][0] == "0"
    assert float(rows[1][5]) == pytest.approx(float(r.values.flat[0]))
    assert float(rows[1 + 2 * cells][5]) == pytest.approx(float(r.extras["values_per_pair"][1].flat[0]))


def test_a_dataset_with_bad_pairs_fails_that_analysis_with_one_sentence(gpt2_dir, tmp_path):
    bad = IOI[:1] + [dict(IOI[1], answer=" Alicezzq")]
    project = run_experiment(parse_experiment(experiment(gpt2_dir, bad, ANALYSES[:1]), tmp_path))
    r = project.analyses[0].result
    assert r.status == "failed" and "pair 1: the answer ' Alicezzq' is" in r.message
    lists = IOI[:1] + [dict(IOI[1], answer=[" Alice", " Kate"])]
    project = run_experiment(parse_experiment(experiment(gpt2_dir, lists, ANALYSES[:1] + ANALYSES[-1:]), tmp_path))
    good, trace = (e.result for e in project.analyses)
    assert good.status == "complete"
    assert trace.status == "failed" and "one answer token, but pair 1 gives 2" in trace.message


def test_a_kind_without_a_dataset_form_fails_with_one_sentence(gpt2_dir, tmp_path):
    att = {"name": "att", "kind": "attention_patterns"}
    assert kinds.get("attention_patterns").dataset_job is None
    r = run_experiment(parse_experiment(experiment(gpt2_dir, IOI[:2], [att]), tmp_path)).analyses[0].result
    assert r.status == "failed"
    assert r.message == ("analysis 'att': attention patterns runs on one prompt pair, not on a dataset of pairs; "
                         "use a single pair for it.")


def test_editing_the_shown_pair_of_a_dataset_is_undoable():
    from desktop_app.project.document import Project

    data = prompts_from_json([p.to_dict() for p in ioi_pairs(3, seed=0).pairs])
    project = Project(prompts=data)
    project.set_prompt_field("answer", " Bob")
    assert project.prompts.pairs[0].answer == " Bob" and project.prompts.pairs[1:] == data.pairs[1:]
    project.set_prompt_field("answer", data.answer)
    assert project.prompts == data
    project.set_prompt_field("clean", "Something else entirely, with no names")
    assert project.prompts.pairs[0].spans == () and len(project.prompts) == 3
