"""model.quantize in specs, experiment files and project files."""
import json

import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.document import Project
from desktop_app.project.execute import with_model_overrides
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.specs import ModelRef


def test_model_ref_quantize_round_trips_and_is_checked():
    m = ModelRef("/m", dtype="bfloat16", quantize="int4")
    assert m.to_dict()["quantize"] == "int4"
    assert ModelRef.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    assert "quantize" not in ModelRef("/m").to_dict()  # the default keeps older files unchanged
    assert ModelRef.from_dict({"path": "/m"}).quantize == "none"
    for bad in ("int3", "INT8", 8, None):
        with pytest.raises(SpecError, match="'quantize'"):
            ModelRef("/m", quantize=bad)


def test_memory_bytes_is_recorded_but_not_identity():
    m = ModelRef("/m", quantize="int8", memory_bytes=12345)
    assert ModelRef.from_dict(json.loads(json.dumps(m.to_dict()))).memory_bytes == 12345
    assert m == ModelRef("/m", quantize="int8") and "memory_bytes" not in ModelRef("/m").to_dict()
    with pytest.raises(SpecError, match="'memory_bytes'"):
        ModelRef("/m", memory_bytes=-1)


def test_overrides():
    m = ModelRef("/m", quantize="int8")
    assert with_model_overrides(m).quantize == "int8"
    assert with_model_overrides(m, quantize="none").quantize == "none"
    with pytest.raises(SpecError):
        with_model_overrides(m, quantize="fp4")


def test_saved_in_the_project(tmp_path):
    path = save_project(Project(model=ModelRef("/m", quantize="int8")), tmp_path / "p.iwb")
    assert load_project(path).model.quantize == "int8"
