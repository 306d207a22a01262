"""Undoable dataset edits (project.dataset_edit), Qt-free."""
import subprocess
import sys

from desktop_app.engine.datasets import PairText
from desktop_app.project import dataset_edit
from desktop_app.project.dataset_prompts import DatasetPrompts
from desktop_app.project.document import Project
from desktop_app.project.specs import Prompts
from desktop_app.project.undo import UndoStack

P0 = PairText("When Mary and John went, John gave it to", "When Mary and John went, Mary gave it to", " Mary", " John",
              (("IO", (5, 9), (5, 9)),))
P1 = PairText("a b c", "a b d", " x", " y")


def test_a_single_pair_is_shown_as_one_row_and_an_empty_one_as_none():
    assert dataset_edit.pairs_of(Prompts(clean="")) == []
    assert dataset_edit.pairs_of(Prompts("a", "b", "c", "d")) == [PairText("a", "b", "c", "d")]


def test_edits_add_remove_undo_in_order():
    project = Project(prompts=Prompts("a", "b", " c", " d", prepend_bos=True))
    stack = UndoStack(project)
    stack.push(dataset_edit.replace_all(project, [P0, P1], "set"))
    assert isinstance(project.prompts, DatasetPrompts) and project.prompts.prepend_bos is True
    stack.push(dataset_edit.edit_cell(project, 1, "answer", '[" x", " X"]'))
    assert project.prompts.pairs[1].answer == (" x", " X")
    stack.push(dataset_edit.edit_cell(project, 0, "clean", "When Mary and John went, Bill gave it to"))
    assert project.prompts.pairs[0].spans == P0.spans  # the text at IO is unchanged: the name stays
    stack.push(dataset_edit.edit_cell(project, 0, "clean", "When Anna and John went, John gave it to"))
    assert project.prompts.pairs[0].spans == ()  # the text at IO changed: the name is dropped
    stack.push(dataset_edit.add_pair(project))
    stack.push(dataset_edit.remove_pairs(project, [0, 1, 2]))
    assert project.prompts == Prompts(clean="", prepend_bos=True)
    for _ in range(4):
        stack.undo()
    assert project.prompts.pairs == (P0, PairText("a b c", "a b d", (" x", " X"), " y"))
    stack.undo()
    assert project.prompts.pairs == (P0, P1)
    stack.undo()
    assert project.prompts == Prompts("a", "b", " c", " d", prepend_bos=True)


def test_answer_text_round_trips():
    for value in (" Mary", (" Mary", " mary"), "[not json"):
        assert dataset_edit.answer_value(dataset_edit.answer_text(value)) == value
    assert dataset_edit.answer_value('[" one"]') == " one"


def test_the_module_imports_without_qt_or_torch():
    code = ("import sys; sys.modules['PySide6'] = None; sys.modules['torch'] = None; "
            "import desktop_app.project.dataset_edit")
    subprocess.run([sys.executable, "-c", code], check=True)
