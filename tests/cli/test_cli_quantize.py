"""`run` with model.quantize in the experiment file and the --quantize override."""
import json

import numpy as np
import pytest
from cli_helpers import experiment_dict, write_json

from desktop_app.cli import main
from desktop_app.project.iwb import load_project

pytest.importorskip("bitsandbytes")

RESID = [{"name": "resid", "kind": "activation_patching", "component": "resid_pre", "positions": "each",
          "direction": "denoise", "metric": "logit_diff"}]


def _run(tmp_path, ioi_gpt2_dir, name, *extra, **model):
    data = experiment_dict(ioi_gpt2_dir, RESID)
    data["model"].update(model)
    exp = write_json(tmp_path / f"{name}.json", data)
    out = tmp_path / f"{name}.iwb"
    code = main(["run", str(exp), "--out", str(out), "--quiet", *extra])
    return code, out


def test_quantize_from_the_file_and_the_option(tmp_path, ioi_gpt2_dir):
    code, plain = _run(tmp_path, ioi_gpt2_dir, "plain")
    assert code == 0 and load_project(plain).model.quantize == "none"
    code, q8 = _run(tmp_path, ioi_gpt2_dir, "q8", quantize="int8")
    assert code == 0
    project = load_project(q8)
    assert project.model.quantize == "int8"
    assert 0 < project.model.memory_bytes < 0.7 * load_project(plain).model.memory_bytes  # as stored (0.63 measured)
    a, b = (load_project(p).entry("resid").result for p in (plain, q8))
    assert b.status == "complete" and 0 < np.abs(a.values - b.values).max() < 0.06  # see test_quantize.py
    code, q4 = _run(tmp_path, ioi_gpt2_dir, "q4", "--quantize", "int4", quantize="int8")
    assert code == 0 and load_project(q4).model.quantize == "int4"


def test_info_reports_the_quantisation_and_memory(tmp_path, ioi_gpt2_dir, capsys):
    code, q8 = _run(tmp_path, ioi_gpt2_dir, "q8", quantize="int8")
    capsys.readouterr()
    assert code == 0 and main(["info", str(q8)]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["quantize"] == "int8" and model["memory_bytes"] == load_project(q8).model.memory_bytes > 0


def test_bad_quantize_is_one_error_line(tmp_path, ioi_gpt2_dir, capsys):
    code, _ = _run(tmp_path, ioi_gpt2_dir, "bad", "--quantize", "int3")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and "quantize" in err[0]
    data = experiment_dict(ioi_gpt2_dir, RESID)
    data["model"]["quantize"] = 8
    exp = write_json(tmp_path / "bad2.json", data)
    assert main(["run", str(exp), "--out", str(tmp_path / "bad2.iwb"), "--quiet"]) == 2
    assert "'quantize'" in capsys.readouterr().err
    assert json.loads(exp.read_text())["model"]["quantize"] == 8
