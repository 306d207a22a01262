"""Undoable edits of prompts, specs and selections (glue `core/command.py` style command objects).

A command captures the old value when it is created and applies itself on redo(). Computed results are
not undoable: they are set on the Project directly. Consecutive text edits of the same prompt field merge
into one command, so one undo reverts a burst of typing, not one keystroke.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from desktop_app.project.document import AnalysisEntry, Project
from desktop_app.project.specs import AnalysisSpec, ModelRef


class Command:
    text = ""

    def redo(self, project: Project) -> None:
        raise NotImplementedError

    def undo(self, project: Project) -> None:
        raise NotImplementedError

    def merge_with(self, newer: "Command") -> bool:
        """Absorb `newer` (already applied) into self; return False if the two stay separate."""
        return False


class SetPromptField(Command):
    def __init__(self, project: Project, field: str, value: str | bool | None):
        self.field, self.new = field, value
        self.old = getattr(project.prompts, field)
        self.text = f"Edit {field.replace('_', ' ')}"

    def redo(self, project):
        project.set_prompt_field(self.field, self.new)

    def undo(self, project):
        project.set_prompt_field(self.field, self.old)

    def merge_with(self, newer):
        if isinstance(newer, SetPromptField) and newer.field == self.field and isinstance(self.new, str):
            self.new = newer.new
            return True
        return False


class SetModel(Command):
    text = "Change model"

    def __init__(self, project: Project, model: ModelRef | None):
        self.old, self.new = project.model, model

    def redo(self, project):
        project.set_model(self.new)

    def undo(self, project):
        project.set_model(self.old)


class AddAnalysis(Command):
    def __init__(self, project: Project, spec: AnalysisSpec, index: int | None = None):
        self.spec = spec
        self.index = len(project.analyses) if index is None else index
        self.text = f"Add analysis {spec.name}"

    def redo(self, project):
        project.add_analysis(self.spec, self.index)

    def undo(self, project):
        project.remove_analysis(self.spec.name)


class RemoveAnalysis(Command):
    """Undo puts the analysis back where it was, with the result it had (the removal is what is undone)."""

    def __init__(self, project: Project, name: str):
        self.name = name
        self.index = project.index_of(name)
        self.entry: AnalysisEntry | None = None
        self.text = f"Remove analysis {name}"

    def redo(self, project):
        self.index, self.entry = project.remove_analysis(self.name)

    def undo(self, project):
        project.add_analysis(self.entry, self.index)


class ReplaceSpec(Command):
    def __init__(self, project: Project, name: str, spec: AnalysisSpec):
        self.old = project.entry(name).spec
        self.new = spec
        self.text = f"Edit analysis {name}"

    def redo(self, project):
        project.replace_spec(self.old.name, self.new)

    def undo(self, project):
        project.replace_spec(self.new.name, self.old)


def edit_spec(project: Project, analysis: str, /, **changes) -> ReplaceSpec:
    """A ReplaceSpec command changing some fields (`name=` renames) of an analysis, validated up front."""
    return ReplaceSpec(project, analysis, replace(project.entry(analysis).spec, **changes))


class SetViewValue(Command):
    """A selection or other view-state value (selected hook points, the current analysis, colour range)."""

    def __init__(self, project: Project, key: str, value: Any, text: str = ""):
        self.key, self.new, self.old = key, value, project.view(key)
        self.text = text or f"Change {key.replace('_', ' ')}"

    def redo(self, project):
        project.set_view(self.key, self.new)

    def undo(self, project):
        project.set_view(self.key, self.old)


class Macro(Command):
    """Several commands undone and redone as one."""

    def __init__(self, text: str, commands: list[Command]):
        self.text, self.commands = text, list(commands)

    def redo(self, project):
        for c in self.commands:
            c.redo(project)

    def undo(self, project):
        for c in reversed(self.commands):
            c.undo(project)


class UndoStack:
    def __init__(self, project: Project, limit: int = 500):
        self.project = project
        self.limit = limit
        self._commands: list[Command] = []
        self._index = 0  # commands[:index] are applied
        self._clean: int | None = 0
        self._listeners: list[Callable[["UndoStack"], None]] = []

    def subscribe(self, callback: Callable[["UndoStack"], None]) -> None:
        self._listeners.append(callback)

    def _emit(self):
        for cb in list(self._listeners):
            cb(self)

    def push(self, command: Command, merge: bool = True) -> None:
        """Apply `command` and record it. If it fails (e.g. SpecError) nothing is recorded."""
        command.redo(self.project)
        del self._commands[self._index:]
        if self._clean is not None and self._clean > self._index:
            self._clean = None  # the saved state was in the discarded redo branch: unreachable now
        top = self._commands[-1] if self._commands else None
        # Never merge into the command that marks the saved state, so undo can get back to it.
        if merge and top is not None and self._clean != self._index and top.merge_with(command):
            pass
        else:
            self._commands.append(command)
            self._index += 1
            if len(self._commands) > self.limit:
                del self._commands[0]
                self._index -= 1
                self._clean = None if self._clean in (None, 0) else self._clean - 1
        self._emit()

    def undo(self) -> None:
        if self.can_undo():
            self._index -= 1
            self._commands[self._index].undo(self.project)
            self._emit()

    def redo(self) -> None:
        if self.can_redo():
            self._commands[self._index].redo(self.project)
            self._index += 1
            self._emit()

    def can_undo(self) -> bool:
        return self._index > 0

    def can_redo(self) -> bool:
        return self._index < len(self._commands)

    def undo_text(self) -> str:
        return self._commands[self._index - 1].text if self.can_undo() else ""

    def redo_text(self) -> str:
        return self._commands[self._index].text if self.can_redo() else ""

    def set_clean(self) -> None:
        self._clean = self._index
        self._emit()

    def is_clean(self) -> bool:
        return self._clean == self._index

    def clear(self) -> None:
        self._commands, self._index, self._clean = [], 0, 0
        self._emit()

    def __len__(self) -> int:
        return len(self._commands)
