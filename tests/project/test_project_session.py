"""The Qt-free session model: events, the model a result was computed with, staleness, Run all's list, SAE
attachments kept in the document (undoable and saved)."""
import json
import zipfile

import numpy as np

from desktop_app.project.document import Project, model_fingerprint
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.session import SAEAttachment, Session
from desktop_app.project.specs import ActivationPatchingSpec, ModelRef

from iwb_testkit import make_result

A = ModelRef("/models/a", config_hash="aaaa")
B = ModelRef("/models/b", config_hash="bbbb")


def _session():
    s = Session(Project(model=A))
    events = []
    s.subscribe(lambda session, event, detail: events.append((event, detail)))
    return s, events


def test_events_and_selection():
    s, events = _session()
    s.project.add_analysis(ActivationPatchingSpec("r"))
    assert events[-1] == ("document", ("analyses", "r"))
    s.select("r")
    s.select("r")  # no change, no event
    s.select("missing")
    s.set_loaded(B)
    s.set_running("r")
    assert [e for e, _ in events] == ["document", "selected", "selected", "loaded", "running"]
    assert s.selected is None and s.loaded == B and s.running == "r"
    s.select("r")
    s.project.remove_analysis("r")
    assert s.selected is None


def test_a_result_of_another_model_is_stale_and_keeps_its_values():
    s, _ = _session()
    s.project.add_analysis(ActivationPatchingSpec("r"))
    result = make_result()
    s.project.set_result("r", result, model=A)
    s.set_loaded(A)
    assert s.stale_reason("r") == "" and s.computed_with_loaded("r")
    s.set_loaded(B)
    reason = s.stale_reason("r")
    assert "another model" in reason and "/models/a" in reason and not s.computed_with_loaded("r")
    assert s.project.entry("r").result is result
    # the same folder with a changed config.json is another model too
    s.set_loaded(ModelRef("/models/a", config_hash="cccc"))
    assert s.stale_reason("r")
    # another quantisation of the same weights is another model
    fp = model_fingerprint(A)
    s.project.entry("r").result_model = {**fp, "quantize": "int8"}
    s.set_loaded(A)
    assert "int8" in s.stale_reason("r")


def test_run_all_lists_empty_stale_and_unfinished_in_order():
    s, _ = _session()
    s.set_loaded(A)
    for name in ("done", "empty", "partial", "other_model", "edited"):
        s.project.add_analysis(ActivationPatchingSpec(name))
    for name, status, model in (("done", "complete", A), ("partial", "partial", A), ("other_model", "complete", B),
                                ("edited", "complete", A)):
        s.project.set_result(name, make_result(name, status=status), model=model)
    s.project.replace_spec("edited", ActivationPatchingSpec("edited", metric="kl_div"))
    assert s.to_run() == ["empty", "partial", "other_model", "edited"]


def test_result_model_round_trips_and_old_files_take_the_projects_model(tmp_path):
    p = Project(model=A)
    p.add_analysis(ActivationPatchingSpec("r"))
    p.set_result("r", make_result(), model=B)
    save_project(p, tmp_path / "p.iwb")
    again = load_project(tmp_path / "p.iwb")
    assert again.entry("r").result_model == model_fingerprint(B)
    assert "another model" in again.stale_reason("r")

    # a file written before results recorded their model
    with zipfile.ZipFile(tmp_path / "p.iwb") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    doc = json.loads(members["project.json"])
    del doc["analyses"][0]["result_model"]
    members["project.json"] = json.dumps(doc).encode()
    with zipfile.ZipFile(tmp_path / "old.iwb", "w") as zf:
        for n, data in members.items():
            zf.writestr(n, data)
    old = load_project(tmp_path / "old.iwb")
    assert old.entry("r").result_model == model_fingerprint(A) and old.stale_reason("r") == ""


def test_learning_the_config_hash_is_not_an_edit():
    p = Project(model=ModelRef("/models/a"))
    p.add_analysis(ActivationPatchingSpec("r"))
    p.set_result("r", make_result())
    p.mark_saved(None)
    assert p.learn_config_hash(A) and not p.dirty and p.model == A
    assert p.entry("r").result_model["config_hash"] == "aaaa"
    assert not p.learn_config_hash(B)  # another folder is a real change


def test_sae_attachments_are_undoable_and_saved(tmp_path):
    s, events = _session()
    dash = {"corpus": "c.txt", "features": [{"feature": 3, "density": 0.5}]}
    s.set_saes([SAEAttachment("/saes/x", "blocks.0.hook_resid_post")])
    s.update_sae("blocks.0.hook_resid_post", "Build dashboards", dashboards=dash)
    s.update_sae("blocks.0.hook_resid_post", "Edit features", edits=[{"feature": 3, "op": "ablate", "value": 0.0}])
    assert ("saes", s.saes()) in [(e, d) for e, d in events if e == "saes"][-1:]
    save_project(s.project, tmp_path / "p.iwb")
    again = Session(load_project(tmp_path / "p.iwb")).saes()
    assert again == s.saes() and again[0].dashboards == dash and again[0].edits[0]["op"] == "ablate"
    s.undo.undo()
    assert s.saes()[0].edits == [] and s.saes()[0].dashboards == dash
    s.undo.undo()
    s.undo.undo()
    assert s.saes() == []
    s.undo.redo()
    assert s.saes()[0].path == "/saes/x"
    np.testing.assert_equal(len(s.undo), 3)
