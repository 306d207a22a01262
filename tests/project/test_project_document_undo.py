import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.project.document import Project
from desktop_app.project.specs import ActivationPatchingSpec, CausalTracingSpec, ModelRef, Prompts
from desktop_app.project.undo import (AddAnalysis, Macro, RemoveAnalysis, ReplaceSpec, SetModel, SetPromptField,
                                      SetViewValue, UndoStack, edit_spec)

from iwb_testkit import make_result


def test_observers_and_dirty_flag():
    p = Project()
    events = []
    unsubscribe = p.subscribe(lambda proj, ev, detail: events.append((ev, detail)))
    assert not p.dirty
    p.set_prompt_field("clean", "hello")
    p.set_prompt_field("clean", "hello")  # no change, no event
    p.add_analysis(ActivationPatchingSpec("r"))
    p.set_result("r", make_result("r"))
    p.set_view("selected_hooks", ["blocks.0.hook_resid_pre"])
    assert [e for e, _ in events] == ["prompts", "analyses", "result", "view"]
    assert p.dirty and p.change_count == 4
    p.mark_saved("/tmp/x.iwb")
    assert not p.dirty and events[-1] == ("saved", p.path)
    unsubscribe()
    p.set_model(ModelRef("/m"))
    assert len(events) == 5 and p.dirty


def test_document_rules():
    p = Project()
    p.add_analysis(ActivationPatchingSpec("r"))
    with pytest.raises(SpecError, match="already exists"):
        p.add_analysis(ActivationPatchingSpec("r"))
    with pytest.raises(SpecError, match="no analysis named 'zz'"):
        p.entry("zz")
    with pytest.raises(ValueError):
        p.set_view("bad", {1, 2})
    assert p.unique_name("r") == "r 2"
    p.set_result("r", make_result("r"))
    assert not p.entry("r").stale
    p.replace_spec("r", ActivationPatchingSpec("r", metric="kl_div"))
    assert p.entry("r").stale and p.entry("r").result is not None


def test_prompt_typing_merges_and_undoes_in_one_step():
    p = Project(prompts=Prompts("start"))
    stack = UndoStack(p)
    for text in ["startx", "startxy", "startxyz"]:
        stack.push(SetPromptField(p, "clean", text))
    stack.push(SetPromptField(p, "answer", " Mary"))
    assert len(stack) == 2 and stack.undo_text() == "Edit answer"
    stack.undo()
    assert p.prompts == Prompts("startxyz")
    stack.undo()
    assert p.prompts == Prompts("start") and not stack.can_undo()
    stack.redo()
    stack.redo()
    assert p.prompts == Prompts("startxyz", answer=" Mary") and not stack.can_redo()


def test_merging_stops_at_the_clean_state():
    p = Project(prompts=Prompts("a"))
    stack = UndoStack(p)
    stack.push(SetPromptField(p, "clean", "ab"))
    stack.set_clean()
    stack.push(SetPromptField(p, "clean", "abc"))
    assert not stack.is_clean() and len(stack) == 2
    stack.undo()
    assert stack.is_clean() and p.prompts.clean == "ab"


def test_spec_edits_add_remove_and_selection_are_undoable():
    p = Project()
    stack = UndoStack(p)
    stack.push(AddAnalysis(p, ActivationPatchingSpec("r")))
    stack.push(AddAnalysis(p, CausalTracingSpec("t", "Mary")))
    p.set_result("r", make_result("r"))  # not a command: results are not undoable
    stack.push(edit_spec(p, "r", metric="answer_prob", name="r2"))
    assert p.names() == ["r2", "t"] and p.entry("r2").spec.metric == "answer_prob"
    stack.push(RemoveAnalysis(p, "r2"))
    stack.push(SetViewValue(p, "selected_hooks", ["blocks.1.hook_mlp_out"]))
    stack.push(SetModel(p, ModelRef("/m")))
    assert p.names() == ["t"]
    stack.undo(); stack.undo()
    assert p.model is None and "selected_hooks" not in p.view_state
    stack.undo()
    assert p.names() == ["r2", "t"] and p.entry("r2").result is not None  # back in place, result kept
    stack.undo()
    assert p.entry("r").spec == ActivationPatchingSpec("r")
    stack.undo(); stack.undo()
    assert p.names() == [] and not stack.can_undo()
    for _ in range(6):
        stack.redo()
    assert p.names() == ["t"] and p.model == ModelRef("/m")
    assert p.view("selected_hooks") == ["blocks.1.hook_mlp_out"]


def test_invalid_edit_changes_nothing_and_records_nothing():
    p = Project()
    stack = UndoStack(p)
    stack.push(AddAnalysis(p, ActivationPatchingSpec("r")))
    with pytest.raises(SpecError, match="'metric'"):
        stack.push(edit_spec(p, "r", metric="nonsense"))
    with pytest.raises(SpecError, match="already exists"):
        stack.push(AddAnalysis(p, ActivationPatchingSpec("r")))
    assert len(stack) == 1 and p.entry("r").spec == ActivationPatchingSpec("r")


def test_new_command_drops_redo_branch_and_macro():
    p = Project(prompts=Prompts("a"))
    stack = UndoStack(p)
    stack.push(SetViewValue(p, "x", 1))
    stack.undo()
    stack.push(Macro("two", [SetPromptField(p, "clean", "b"), SetViewValue(p, "x", 2)]))
    assert not stack.can_redo() and len(stack) == 1
    stack.undo()
    assert p.prompts.clean == "a" and "x" not in p.view_state
    assert stack.redo_text() == "two"
