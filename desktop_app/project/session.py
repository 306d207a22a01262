"""The session model: what one window holds, Qt-free (napari's `components/` under its `_qt/`).

A Session owns the document (Project) and its undo stack, plus what belongs to the running window rather than
to the file: the reference of the model loaded right now, the analysis shown, the analysis running, the SAEs
attached. Observers get `callback(session, event, detail)`; the window's small Qt controllers subscribe and
repaint, and send their edits back as undoable commands. Every document event is passed on as "document".

Events: project (a new document), loaded (model loaded or unloaded), selected (the shown analysis), running
(an analysis starts or ends), saes (attachments changed), document (detail: (project event, its detail)).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from desktop_app.project.document import Project, add_observer, model_fingerprint, same_model
from desktop_app.project.specs import ModelRef
from desktop_app.project.undo import UndoStack

EVENTS = ("project", "loaded", "selected", "running", "saes", "document")
Observer = Callable[["Session", str, Any], None]


@dataclass
class SAEAttachment:
    """An SAE read at a hook point of the loaded model; saved in the project's view state."""
    path: str
    hook: str
    dashboards: dict = field(default_factory=dict)  # corpus path, features, their top contexts (JSON-able)
    edits: list = field(default_factory=list)  # feature edits: {feature, op, value, positions}
    force_hook: bool = False  # attached although its file names another hook or model (the user forced it)

    def to_dict(self) -> dict:
        d = {"path": self.path, "hook": self.hook, "dashboards": self.dashboards, "edits": self.edits}
        return {**d, "force_hook": True} if self.force_hook else d

    @classmethod
    def from_dict(cls, d: dict) -> "SAEAttachment":
        if not isinstance(d, dict) or not isinstance(d.get("path"), str) or not isinstance(d.get("hook"), str):
            raise ValueError("an SAE attachment needs a path and a hook")
        return cls(d["path"], d["hook"], dict(d.get("dashboards") or {}), list(d.get("edits") or []),
                   d.get("force_hook") is True)


class Session:
    def __init__(self, project: Project | None = None):
        self._observers: list[Observer] = []
        self.project = project if project is not None else Project()
        self.undo = UndoStack(self.project)
        self._unsubscribe = self.project.subscribe(self._document_changed)
        self.loaded: ModelRef | None = None
        self.selected: str | None = None
        self.running: str | None = None

    # ---- observers ----
    def subscribe(self, callback: Observer) -> Callable[[], None]:
        return add_observer(self._observers, callback)

    def _emit(self, event: str, detail: Any = None) -> None:
        for cb in list(self._observers):
            cb(self, event, detail)

    def _document_changed(self, project, event, detail):
        if event == "analyses" and self.selected is not None and self.selected not in project.names():
            self.selected = None
        self._emit("document", (event, detail))

    # ---- the document ----
    def set_project(self, project: Project) -> None:
        """Replace the document (open, new); the undo history starts over, the loaded model stays."""
        self._unsubscribe()
        self.project = project
        self.undo = UndoStack(project)
        self._unsubscribe = project.subscribe(self._document_changed)
        self.selected = None
        self._emit("project", project)

    def push(self, command) -> None:
        """Apply an undoable edit of the document."""
        self.undo.push(command)

    # ---- the loaded model ----
    def set_loaded(self, ref: ModelRef | None) -> None:
        self.loaded = ref
        self._emit("loaded", ref)

    def stale_reason(self, name: str) -> str:
        """Why the result of `name` does not belong to what is loaded and set now (empty when it does)."""
        return self.project.stale_reason(name, self.loaded)

    def computed_with_loaded(self, name: str) -> bool:
        """True when the result of `name` was computed with the loaded model (so a click may recompute)."""
        entry = self.project.entry(name)
        return (self.loaded is not None and entry.result is not None
                and same_model(entry.result_model, model_fingerprint(self.loaded)))

    def to_run(self) -> list[str]:
        """The analyses Run all computes, in order: those without a result, and those whose result is stale or
        unfinished."""
        out = []
        for entry in self.project.analyses:
            r = entry.result
            if r is None or r.status != "complete" or self.stale_reason(entry.name):
                out.append(entry.name)
        return out

    # ---- selection and running ----
    def select(self, name: str | None) -> None:
        if name is not None and name not in self.project.names():
            name = None
        if name != self.selected:
            self.selected = name
            self._emit("selected", name)

    def set_running(self, name: str | None) -> None:
        if name != self.running:
            self.running = name
            self._emit("running", name)

    # ---- SAEs (kept in the document's view state, so they are saved, undone and restored with it) ----
    def saes(self) -> list[SAEAttachment]:
        out = []
        for d in self.project.view("saes", []) or []:
            try:
                out.append(SAEAttachment.from_dict(d))
            except ValueError:
                continue  # a hand-edited file: skip the broken attachment, keep the rest
        return out

    def set_saes(self, saes: list[SAEAttachment], text: str = "Attach SAE") -> None:
        from desktop_app.project.undo import SetViewValue

        self.push(SetViewValue(self.project, "saes", [s.to_dict() for s in saes] or None, text))
        self._emit("saes", saes)

    def update_sae(self, hook: str, text: str, **changes) -> None:
        saes = self.saes()
        for s in saes:
            if s.hook == hook:
                for k, v in changes.items():
                    setattr(s, k, v)
        self.set_saes(saes, text)
