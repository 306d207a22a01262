import json
import os

import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.experiment import Experiment, load_experiment, parse_experiment
from desktop_app.project.specs import ActivationPatchingSpec, ModelRef, Prompts

from iwb_testkit import all_specs

CONTRACT_EXAMPLE = {
    "version": 1,
    "model": {"path": "models/my-model", "dtype": "float32", "device": "cpu"},
    "prompts": {"clean": "When Mary and John went to the store, John gave a drink to",
                "corrupted": "When Mary and John went to the store, Mary gave a drink to",
                "answer": " Mary", "wrong_answer": " John"},
    "analyses": [{"name": "resid", "kind": "activation_patching", "component": "resid_pre",
                  "positions": "each", "direction": "denoise", "metric": "logit_diff_recovered"}],
}


def write(tmp_path, data, name="exp.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data, indent=2), encoding="utf-8")
    return p


def test_contract_example_loads_and_resolves_relative_model_path(tmp_path):
    exp = load_experiment(write(tmp_path, CONTRACT_EXAMPLE))
    assert exp.model == ModelRef(os.path.join(str(tmp_path), "models", "my-model"), "float32", "cpu")
    assert exp.prompts.answer == " Mary" and exp.prompts.prepend_bos is None
    assert exp.analyses == [ActivationPatchingSpec("resid", "resid_pre", "each", "denoise", "logit_diff_recovered")]
    assert exp.source == tmp_path / "exp.json"


def test_absolute_model_path_is_kept(tmp_path):
    data = {**CONTRACT_EXAMPLE, "model": {"path": "/opt/models/x"}}
    assert load_experiment(write(tmp_path, data)).model.path == "/opt/models/x"


def test_round_trip_with_every_kind(tmp_path):
    exp = Experiment(ModelRef(str(tmp_path / "models" / "m"), "bfloat16", "cuda:0"),
                     Prompts("a b c", "a b d", " x", " y", prepend_bos=True), all_specs())
    path = tmp_path / "sub" / "e.json"
    path.parent.mkdir()
    path.write_text(exp.to_json(relative_to=path.parent), encoding="utf-8")
    assert json.loads(path.read_text())["model"]["path"] == os.path.join("..", "models", "m")
    again = load_experiment(path)
    assert (again.model, again.prompts, again.analyses) == (exp.model, exp.prompts, exp.analyses)


def test_syntax_error_reports_line_and_column(tmp_path):
    text = '{\n  "version": 1,\n  "model": {"path": "m"},\n  "prompts": {"clean": "x",}\n}\n'
    with pytest.raises(SpecError) as e:
        load_experiment(write(tmp_path, text))
    assert "line 4, column" in str(e.value) and "exp.json" in str(e.value)


@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(version=2), "version 2"),
    (lambda d: d.update(version="1"), "'version'"),
    (lambda d: d.pop("prompts"), "'prompts'"),
    (lambda d: d.update(extra=1), "'extra'"),
    (lambda d: d["analyses"][0].update(kind="nope"), "nope"),
    (lambda d: d["analyses"][0].pop("name"), "'name'"),
    (lambda d: d["analyses"].append(dict(d["analyses"][0])), "two analyses"),
    (lambda d: d["model"].update(dtype="fp8"), "'dtype'"),
    (lambda d: d["prompts"].update(clean=""), "clean"),
    (lambda d: d.update(analyses={}), "'analyses'"),
])
def test_bad_experiments_name_the_problem(tmp_path, edit, match):
    data = json.loads(json.dumps(CONTRACT_EXAMPLE))
    edit(data)
    with pytest.raises(SpecError, match=match):
        load_experiment(write(tmp_path, data))


def test_missing_file_and_non_object(tmp_path):
    with pytest.raises(SpecError, match="does not exist"):
        load_experiment(tmp_path / "missing.json")
    with pytest.raises(SpecError, match="one JSON object"):
        parse_experiment("[1, 2]")
