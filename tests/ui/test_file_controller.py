"""The File menu's controller works from its explicit dependencies alone: no main window, fakes for the panes."""
from types import SimpleNamespace

import pytest
from PySide6.QtWidgets import QWidget

from desktop_app.project.document import Project
from desktop_app.project.session import Session
from desktop_app.project.specs import ModelRef, Prompts
from desktop_app.project.undo import SetPromptField
from desktop_app.ui.file_ops import FileController


class FakeModelController:
    def __init__(self, ref=None):
        self.ref, self.shown, self.loads, self.browsed = ref, [], 0, []

    def show_ref(self, ref):
        self.shown.append(ref)

    def load(self):
        self.loads += 1

    def browse(self, gguf=False):
        self.browsed.append(gguf)


@pytest.fixture
def parts(qtbot):
    parent = QWidget()
    qtbot.addWidget(parent)
    log = SimpleNamespace(errors=[], messages=[], status=[], stopped=0, shown=[], titles=0)
    messages = SimpleNamespace(show_error=lambda text, details="": log.errors.append(text),
                               show_message=lambda text, level="info", action_text="", action=None:
                               log.messages.append((text, level, action_text, action)))

    def stop():
        log.stopped += 1

    def title():
        log.titles += 1

    def build(session, model_ctl, result=None):
        return FileController(session, parent, messages, lambda text, ms: log.status.append(text), model_ctl,
                              stop, log.shown.append, title, lambda: result, lambda: False)

    yield build, log
    parent.close()


def test_save_and_open_round_trip_through_the_controller(parts, tmp_path):
    build, log = parts
    session = Session(Project(prompts=Prompts(clean="When Mary and John went", corrupted="When Mary and Anna went")))
    session.push(SetPromptField(session.project, "answer", " John"))
    ctl = build(session, FakeModelController())
    assert session.project.dirty
    path = tmp_path / "p.iwb"
    assert ctl.save_to(path) and not session.project.dirty and log.status == [f"saved {path}"]
    assert ctl.recent.items() == [path.resolve()]

    other = Session()
    model = FakeModelController()
    ctl2 = build(other, model)
    assert ctl2.open_project(path)
    assert other.project.prompts.answer == " John" and other.project.path is not None
    assert log.stopped == 1 and log.shown == [other.project] and log.titles >= 1
    assert model.loads == 0 and not log.errors  # the project names no model: nothing to load


def test_new_project_keeps_the_loaded_model_and_discards_without_asking(parts):
    build, log = parts
    ref = ModelRef("/models/tiny")
    session = Session(Project(prompts=Prompts(clean="a b")))
    session.push(SetPromptField(session.project, "clean", "a b c"))
    ctl = build(session, FakeModelController(ref))
    ctl.new_project()
    assert session.project.model == ref and session.project.prompts.clean == "" and not session.project.dirty


def test_a_missing_model_offers_relocate_and_a_present_one_is_loaded(parts, tmp_path):
    build, log = parts
    model = FakeModelController()
    session = Session(Project(model=ModelRef(str(tmp_path / "gone"))))
    ctl = build(session, model)
    ctl.after_open()
    text, level, action_text, action = log.messages[-1]
    assert "is missing" in text and level == "warning" and action_text == "Relocate…"
    action()
    assert model.browsed == [False] and model.loads == 0
    (tmp_path / "here").mkdir()
    session.set_project(Project(model=ModelRef(str(tmp_path / "here"))))
    ctl.after_open()
    assert model.loads == 1


def test_export_without_a_result_says_so(parts, tmp_path):
    build, log = parts
    ctl = build(Session(), FakeModelController())
    assert not ctl.export_figure(tmp_path / "f.png") and not ctl.export_data(tmp_path / "d.csv")
    assert log.errors == ["there is no result to export; run an analysis first."] * 2
    assert not ctl.export_experiment(tmp_path / "e.json") and "no model" in log.errors[-1]
