"""The loaded model's conformance checks travel in the model part of the project file (shown by `info`)."""
import dataclasses
import json
import zipfile

import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.specs import ModelRef

from iwb_testkit import make_project

CONF = {"family": "gpt2", "total_ms": 3.5,
        "checks": {"decomposition": {"passed": True, "max_abs_diff": 0.0, "tolerance": 1e-4, "time_ms": 0.2,
                                     "note": ""},
                   "restart": {"passed": False, "max_abs_diff": None, "tolerance": 0.0, "time_ms": 0.1,
                               "note": "RuntimeError: shapes"}}}


def test_conformance_round_trips_through_the_project_file(tmp_path):
    project = make_project()
    project.set_model(dataclasses.replace(project.model, conformance=CONF))
    path = save_project(project, tmp_path / "p.iwb")
    with zipfile.ZipFile(path) as zf:
        doc = json.loads(zf.read("project.json"))
    assert doc["model"]["conformance"] == CONF
    assert load_project(path).model.conformance == CONF


def test_a_model_without_checks_writes_no_conformance_field():
    assert "conformance" not in ModelRef("/m").to_dict()
    with pytest.raises(SpecError, match="conformance"):
        ModelRef("/m", conformance="all good")
