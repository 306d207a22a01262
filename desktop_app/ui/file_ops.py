"""The File menu's controller: new / open / save, recent projects, autosave and recovery, export.

FileController is a small Qt-side controller with explicit dependencies over the Qt-free session, like
ModelController and AnalysisController; the window keeps thin methods of the same names for scripts and tests.
Methods taking a `path` are the ones scripts and tests call; the *_dialog methods only ask for the path first.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog, QMessageBox

from desktop_app.engine.errors import WorkbenchError
from desktop_app.project import autosave
from desktop_app.project.document import Project
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.recent import RecentProjects
from desktop_app.project.text_safety import EscapedTextWarning

AUTOSAVE_MS = 30_000
FIGURE_FILTERS = "PNG image (*.png);;SVG vector image (*.svg);;PDF document (*.pdf)"
DATA_FILTERS = "CSV table (*.csv);;NumPy arrays (*.npz)"


class FileController:
    """Dependencies: the session; `parent` (the window: parent of the dialogs and of the autosave timer);
    `messages` (show_error, show_message); `status(text, ms)` (the status bar); the ModelController (`ref`,
    `show_ref`, `load`, `browse`); `stop_analyses()` (cancel the running analysis and the Run-all queue);
    `show_project(project)` (the panes take a new document: undo actions, prompt fields, the analysis panel,
    an empty result pane, view actions); `update_title()`; `current_result()`; `asks()` (False in scripts and
    tests: unsaved changes are then discarded without a question); `figure_selection()` ({dim: index} of the
    slice the result pane shows, so a figure of an attention result shows the same layer and head)."""

    def __init__(self, session, parent, messages, status: Callable[[str, int], None], model_ctl,
                 stop_analyses: Callable[[], None], show_project: Callable[[Project], None],
                 update_title: Callable[[], None], current_result: Callable, asks: Callable[[], bool],
                 figure_selection: Callable[[], dict] = dict):
        self.session, self.parent, self.messages, self.status = session, parent, messages, status
        self.model_ctl, self.stop_analyses, self.show_project = model_ctl, stop_analyses, show_project
        self.update_title, self.current_result, self.asks = update_title, current_result, asks
        self.figure_selection = figure_selection
        self.export_dialog = None
        self.recent = RecentProjects()
        self.autosave_timer = QTimer(parent)
        self.autosave_timer.setInterval(AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.autosave_now)
        self.autosave_timer.start()

    @property
    def project(self) -> Project:
        return self.session.project

    # ---- the document ----
    def set_project(self, project: Project):
        """Show `project` in the window: prompts, model reference, results. Undo history starts afresh."""
        self.stop_analyses()
        self.session.set_project(project)
        self.show_project(project)
        if project.model is not None:
            self.model_ctl.show_ref(project.model)
        with_results = [e.name for e in project.analyses if e.result is not None]
        self.session.select(with_results[-1] if with_results else None)
        self.update_title()

    def new_project(self):
        if self.confirm_discard("start a new project"):
            self.discard_autosave()
            self.set_project(Project(model=self.model_ctl.ref))
            self.project.mark_saved(None)

    def open_project_dialog(self):
        if not self.confirm_discard("open another project"):
            return
        path, _ = QFileDialog.getOpenFileName(self.parent, "Open project", self.start_dir(),
                                              "Interp Workbench projects (*.iwb)")
        if path:
            self.open_project(path, confirmed=True)

    def open_project(self, path, confirmed: bool = False) -> bool:
        if not confirmed and not self.confirm_discard("open another project"):
            return False
        try:
            project = load_project(path)
        except WorkbenchError as err:
            self.messages.show_error(str(err), getattr(err, "details", ""))
            return False
        self.set_project(project)
        self._add_recent(path)
        self.after_open()
        return True

    def after_open(self):
        """Load the project's model if its folder is there; otherwise ask the user to relocate it."""
        ref = self.project.model
        if ref is None:
            return
        if not Path(ref.path).exists():
            self.messages.show_message(
                f"the model {ref.path} is missing; the results can be viewed, and to run analyses choose the "
                f"model's new location with Relocate… and click Load.", "warning",
                "Relocate…", lambda: self.model_ctl.browse(gguf=ref.path.endswith(".gguf")))
            return
        if self.model_ctl.ref is None or self.model_ctl.ref.path != ref.path:
            self.model_ctl.load()

    def save(self) -> bool:
        if self.project.path is None:
            return self.save_as()
        return self.save_to(self.project.path)

    def save_as(self) -> bool:
        start = str(self.project.path or Path(self.start_dir()) / "untitled.iwb")
        path, _ = QFileDialog.getSaveFileName(self.parent, "Save project", start, "Interp Workbench projects (*.iwb)")
        if not path:
            return False
        if not path.endswith(".iwb"):
            path += ".iwb"
        return self.save_to(path)

    def save_to(self, path) -> bool:
        try:
            with warnings.catch_warnings(record=True) as notes:
                warnings.simplefilter("always", EscapedTextWarning)
                save_project(self.project, path)
        except WorkbenchError as err:  # a SaveConflict says where this version was kept instead
            self.messages.show_error(str(err), getattr(err, "details", ""))
            return False
        self.session.undo.set_clean()
        self._add_recent(path)
        self.discard_autosave()
        self.status(f"saved {path}", 5000)
        escaped = [str(n.message) for n in notes if issubclass(n.category, EscapedTextWarning)]
        if escaped:
            self.messages.show_message(f"saved {Path(path).name}, but {escaped[0]}.", "warning")
        return True

    def confirm_discard(self, what: str) -> bool:
        """True if the project may be replaced or closed (saved, not dirty, or the user agrees)."""
        if not self.project.dirty or not self.asks():
            return True
        answer = QMessageBox.question(self.parent, "Unsaved changes",
                                      f"Save the changes to this project before you {what}?",
                                      QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
        if answer == QMessageBox.Save:
            return self.save()
        return answer == QMessageBox.Discard

    def start_dir(self) -> str:
        return str(self.project.path.parent) if self.project.path else str(Path.home())

    # ---- recent projects ----
    def _add_recent(self, path):
        try:
            self.recent.add(path)
        except (OSError, WorkbenchError):
            pass  # the recent list is a convenience; never fail a save over it

    def fill_recent_menu(self, menu):
        menu.clear()
        items = self.recent.items()
        for p in items:
            act = menu.addAction(p.name)
            act.setToolTip(str(p))
            act.triggered.connect(lambda _=False, path=p: self.open_project(path))
        if not items:
            menu.addAction("(none)").setEnabled(False)

    # ---- autosave and recovery ----
    def autosave_now(self):
        if not self.project.dirty:
            return
        try:
            autosave.write_recovery(self.project)
        except WorkbenchError as err:
            self.status(f"autosave failed: {err}", 8000)

    def discard_autosave(self):
        try:
            autosave.discard_recovery()
        except WorkbenchError as err:
            self.status(str(err), 8000)

    def offer_recovery(self):
        rec = autosave.find_recovery()
        if rec is None:
            return
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.saved_at))
        name = rec.original_path.name if rec.original_path else "an unsaved project"
        self.messages.show_message(f"work on {name} autosaved at {when} was not saved before the program ended; "
                                   f"restore it?", "info", "Restore", lambda: self.restore_recovery(rec))

    def restore_recovery(self, rec):
        try:
            project = rec.load()
        except WorkbenchError as err:
            self.messages.show_error(str(err))
            return
        self.set_project(project)
        self.after_open()

    # ---- export ----
    def _need_result(self):
        result = self.current_result()
        if result is None:
            self.messages.show_error("there is no result to export; run an analysis first.")
        return result

    def figure_context(self, result) -> list[str]:
        """The subtitle parts naming the model and prompts the shown result was computed with."""
        from desktop_app.ui.figure_data import figure_context

        name = self.session.selected
        model = None
        if name in self.project.names() and self.project.entry(name).result is result:
            model = self.project.entry(name).result_model
        elif self.session.loaded is not None:  # a result still streaming in: the loaded model computes it
            from desktop_app.project.document import model_fingerprint

            model = model_fingerprint(self.session.loaded)
        return figure_context(model, self.project.prompts)

    def export_figure_dialog(self):
        """The figure export dialog (exportFigureDialog): size, DPI, title, font size, colour limits, preview."""
        from desktop_app.ui.export_dialog import ExportFigureDialog

        result = self._need_result()
        if result is None:
            return None
        start = str(Path(self.start_dir()) / f"{result.name}.png")
        dialog = ExportFigureDialog(result, self.figure_context(result), start, self.parent,
                                    selection=self.figure_selection())
        dialog.accepted.connect(lambda: self.status(f"exported {dialog.written}", 5000))
        self.export_dialog = dialog
        dialog.open()
        return dialog

    def export_figure(self, path, fmt: str | None = None) -> bool:
        from desktop_app.ui.figure import render_figure

        result = self._need_result()
        if result is None:
            return False
        fmt = fmt or Path(path).suffix.lstrip(".").lower()
        try:
            render_figure(result, fmt, path, context=self.figure_context(result), selection=self.figure_selection())
        except (WorkbenchError, ValueError) as err:
            self.messages.show_error(str(err))
            return False
        self.status(f"exported {path}", 5000)
        return True

    def export_data_dialog(self):
        result = self._need_result()
        if result is None:
            return
        start = str(Path(self.start_dir()) / f"{result.name}.csv")
        path, chosen = QFileDialog.getSaveFileName(self.parent, "Export data", start, DATA_FILTERS)
        if path:
            if Path(path).suffix.lower() not in (".csv", ".npz"):
                path += "." + chosen.split("*.")[-1].rstrip(")")
            self.export_data(path)

    def export_data(self, path) -> bool:
        from desktop_app.project.data_export import export_csv, export_npz

        result = self._need_result()
        if result is None:
            return False
        try:
            (export_npz if str(path).lower().endswith(".npz") else export_csv)(result, path)
        except WorkbenchError as err:
            self.messages.show_error(str(err))
            return False
        self.status(f"exported {path}", 5000)
        return True

    def export_experiment_dialog(self):
        start = str(Path(self.start_dir()) / "experiment.json")
        path, _ = QFileDialog.getSaveFileName(self.parent, "Export experiment", start, "Experiment files (*.json)")
        if path:
            self.export_experiment(path)

    def export_experiment(self, path) -> bool:
        """The session as an experiment file: model, prompts and every analysis, runnable headless."""
        from desktop_app.project.experiment import Experiment, save_experiment

        if self.project.model is None:
            self.messages.show_error("there is no model in this session yet; load one before exporting the experiment.")
            return False
        try:
            save_experiment(Experiment(model=self.project.model, prompts=self.project.prompts,
                                       analyses=[e.spec for e in self.project.analyses]), path)
        except WorkbenchError as err:
            self.messages.show_error(str(err))
            return False
        self.status(f"exported {path}; run it with: interp-workbench run {path} --out …", 8000)
        return True

    def copy_figure(self) -> bool:
        from desktop_app.ui.figure import figure_image

        result = self._need_result()
        if result is None:
            return False
        try:
            image = figure_image(result, context=self.figure_context(result), selection=self.figure_selection())
        except (WorkbenchError, ValueError) as err:
            self.messages.show_error(str(err))
            return False
        QGuiApplication.clipboard().setImage(image)
        self.status("figure copied to the clipboard", 5000)
        return True
