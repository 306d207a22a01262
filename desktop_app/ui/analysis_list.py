"""The Analyses pane: every analysis of the project with its kind, status and model; selecting one shows it.

A small controller over the Qt-free session (project.session.Session): it repaints on session events and
sends edits (rename, duplicate, remove) back as undoable commands. Run all asks the window to run the stale
or empty analyses in order.
"""
from __future__ import annotations

import dataclasses

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QHBoxLayout, QInputDialog, QListWidget, QListWidgetItem, QMenu, QPushButton,
                               QVBoxLayout, QWidget)

from desktop_app.project import kinds
from desktop_app.project.undo import AddAnalysis, RemoveAnalysis, ReplaceSpec
from desktop_app.ui.figure_data import model_display_name


def entry_text(session, entry) -> tuple[str, str]:
    """(one line: name, kind, status, model; a tooltip) of an analysis entry."""
    record = kinds.find(entry.spec.kind)
    kind = record.label if record is not None else entry.spec.kind
    r = entry.result
    if r is None:
        status, model = "not run", ""
    else:
        status = r.status
        m = entry.result_model or {}
        model = model_display_name(m.get("path", "")) if m.get("path") else ""
        if m.get("quantize", "none") not in ("", "none"):
            model += f" {m['quantize']}"
    stale = session.stale_reason(entry.name)
    if session.running == entry.name:
        status = "running…"
    text = ("⚠ stale · " if stale else "") + f"{entry.name} — {kind} — {status}" + (f" — {model}" if model else "")
    tip = f"{entry.name}: {kind}, {status}" + (f", computed with {m.get('path')}" if r is not None else "")
    if stale:
        tip += f"\nStale: {stale}; run it again to update it."
    if r is not None and r.message:
        tip += f"\n{r.message}"
    return text, tip


class AnalysisListPanel(QWidget):
    run_all = Signal()
    rerun = Signal(str)  # name

    def __init__(self, parent=None):
        super().__init__(parent)
        self.session = None
        self.list = QListWidget()
        self.list.setObjectName("analysisList")
        self.list.setToolTip("The analyses of this project with kind, status and model; select one to show it; "
                             "right-click to rename, duplicate, remove or run it")
        self.list.setContextMenuPolicy(Qt.CustomContextMenu)
        self.list.customContextMenuRequested.connect(self._menu)
        self.list.currentItemChanged.connect(self._current_changed)
        self.run_all_button = QPushButton("Run all")
        self.run_all_button.setObjectName("runAllButton")
        self.run_all_button.setToolTip("Run every analysis that has no result, or a stale or unfinished one, in order")
        self.run_all_button.clicked.connect(self.run_all.emit)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.run_all_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.list, 1)
        lay.addLayout(row)
        self._filling = False

    def set_session(self, session) -> None:
        self.session = session
        session.subscribe(lambda s, event, detail: self.refresh())
        self.refresh()

    def refresh(self) -> None:
        s = self.session
        self._filling = True
        try:
            self.list.clear()
            for entry in s.project.analyses:
                text, tip = entry_text(s, entry)
                item = QListWidgetItem(text)
                item.setData(Qt.UserRole, entry.name)
                item.setToolTip(tip)
                self.list.addItem(item)
                if entry.name == s.selected:
                    self.list.setCurrentItem(item)
        finally:
            self._filling = False
        self.run_all_button.setEnabled(bool(s.to_run()) and s.running is None)

    def names(self) -> list[str]:
        return [self.list.item(i).data(Qt.UserRole) for i in range(self.list.count())]

    def select(self, name: str) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(Qt.UserRole) == name:
                self.list.setCurrentRow(i)

    def _current_changed(self, item, _previous):
        if self._filling or item is None:
            return
        self.session.select(item.data(Qt.UserRole))

    # ---- edits (undoable) ----
    def rename(self, name: str, new_name: str) -> None:
        s = self.session
        spec = s.project.entry(name).spec
        s.push(ReplaceSpec(s.project, name, dataclasses.replace(spec, name=new_name)))
        if s.selected == name:
            s.select(new_name)

    def duplicate(self, name: str) -> str:
        s = self.session
        spec = s.project.entry(name).spec
        copy = dataclasses.replace(spec, name=s.project.unique_name(f"{name} copy"))
        s.push(AddAnalysis(s.project, copy, s.project.index_of(name) + 1))
        return copy.name

    def remove(self, name: str) -> None:
        s = self.session
        s.push(RemoveAnalysis(s.project, name))

    def _menu(self, pos):
        item = self.list.itemAt(pos)
        if item is None:
            return
        name = item.data(Qt.UserRole)
        menu = QMenu(self)
        run = menu.addAction("Run")
        rename = menu.addAction("Rename…")
        duplicate = menu.addAction("Duplicate")
        remove = menu.addAction("Remove")
        chosen = menu.exec(self.list.viewport().mapToGlobal(pos))
        if chosen is run:
            self.rerun.emit(name)
        elif chosen is rename:
            new, ok = QInputDialog.getText(self, "Rename analysis", "Name", text=name)
            if ok and new.strip() and new.strip() != name:
                try:
                    self.rename(name, new.strip())
                except Exception as err:  # noqa: BLE001 - SpecError: a name in use; shown, nothing changes
                    self.window().show_error(str(err))
        elif chosen is duplicate:
            self.duplicate(name)
        elif chosen is remove:
            self.remove(name)
