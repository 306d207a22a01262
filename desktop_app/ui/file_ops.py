"""File menu work of the main window: new / open / save, recent projects, autosave and recovery, export.

A mixin so main_window.py stays about the panels and the runner. Methods taking a `path` are the ones
scripts and tests call; the *_dialog methods only ask for the path first.
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QFileDialog

from desktop_app.engine.errors import WorkbenchError
from desktop_app.project import autosave
from desktop_app.project.document import Project
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.recent import RecentProjects
from desktop_app.project.text_safety import EscapedTextWarning

AUTOSAVE_MS = 30_000
FIGURE_FILTERS = "PNG image (*.png);;SVG vector image (*.svg);;PDF document (*.pdf)"
DATA_FILTERS = "CSV table (*.csv);;NumPy arrays (*.npz)"


class FileOpsMixin:
    def _init_file_ops(self):
        self.recent = RecentProjects()
        self.autosave_timer = QTimer(self)
        self.autosave_timer.setInterval(AUTOSAVE_MS)
        self.autosave_timer.timeout.connect(self.autosave_now)
        self.autosave_timer.start()

    # ---- the document ----
    def set_project(self, project: Project):
        """Show `project` in the window: prompts, model reference, results. Undo history starts afresh."""
        self.runner.cancel_slot("analysis")
        self.analysis_ctl.run_queue = []
        self.session.set_project(project)
        self.undo_stack.subscribe(self._undo_changed)
        self._undo_changed(self.undo_stack)
        self.act_shared_scale.setChecked(bool(project.view("shared_colour_scale", False)))
        self._sync_prompts_to_edits()
        if project.model is not None:
            self.model_ctl.show_ref(project.model)
        if project.analyses:
            self.analysis_panel.show_spec(project.analyses[0].spec)
        with_results = [e.name for e in project.analyses if e.result is not None]
        self.result_view.set_result(None)
        self.session.select(with_results[-1] if with_results else None)
        self._update_title()
        self.token_timer.start()

    def new_project(self):
        if self.confirm_discard("start a new project"):
            self.discard_autosave()
            self.set_project(Project(model=self.loaded_ref))
            self.project.mark_saved(None)

    def open_project_dialog(self):
        if not self.confirm_discard("open another project"):
            return
        path, _ = QFileDialog.getOpenFileName(self, "Open project", self._start_dir(),
                                              "Interp Workbench projects (*.iwb)")
        if path:
            self.open_project(path, confirmed=True)

    def open_project(self, path, confirmed: bool = False) -> bool:
        if not confirmed and not self.confirm_discard("open another project"):
            return False
        try:
            project = load_project(path)
        except WorkbenchError as err:
            self.show_error(str(err), getattr(err, "details", ""))
            return False
        self.set_project(project)
        self._add_recent(path)
        self._after_open()
        return True

    def _after_open(self):
        """Load the project's model if its folder is there; otherwise ask the user to relocate it."""
        ref = self.project.model
        if ref is None:
            return
        if not Path(ref.path).exists():
            self.show_message(f"the model {ref.path} is missing; the results can be viewed, and to run analyses "
                              f"choose the model's new location with Relocate… and click Load.", "warning",
                              "Relocate…", lambda: self.browse_model(gguf=ref.path.endswith(".gguf")))
            return
        if self.loaded_ref is None or self.loaded_ref.path != ref.path:
            self.load_model()

    def save(self) -> bool:
        if self.project.path is None:
            return self.save_as()
        return self.save_to(self.project.path)

    def save_as(self) -> bool:
        start = str(self.project.path or Path(self._start_dir()) / "untitled.iwb")
        path, _ = QFileDialog.getSaveFileName(self, "Save project", start, "Interp Workbench projects (*.iwb)")
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
            self.show_error(str(err), getattr(err, "details", ""))
            return False
        self.undo_stack.set_clean()
        self._add_recent(path)
        self.discard_autosave()
        self.statusBar().showMessage(f"saved {path}", 5000)
        escaped = [str(n.message) for n in notes if issubclass(n.category, EscapedTextWarning)]
        if escaped:
            self.show_message(f"saved {Path(path).name}, but {escaped[0]}.", "warning")
        return True

    def _start_dir(self) -> str:
        return str(self.project.path.parent) if self.project.path else str(Path.home())

    # ---- recent projects ----
    def _add_recent(self, path):
        try:
            self.recent.add(path)
        except (OSError, WorkbenchError):
            pass  # the recent list is a convenience; never fail a save over it

    def _fill_recent_menu(self):
        menu = self.recent_menu
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
            self.statusBar().showMessage(f"autosave failed: {err}", 8000)

    def discard_autosave(self):
        try:
            autosave.discard_recovery()
        except WorkbenchError as err:
            self.statusBar().showMessage(str(err), 8000)

    def offer_recovery(self):
        rec = autosave.find_recovery()
        if rec is None:
            return
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.saved_at))
        name = rec.original_path.name if rec.original_path else "an unsaved project"
        self.show_message(f"work on {name} autosaved at {when} was not saved before the program ended; "
                          f"restore it?", "info", "Restore", lambda: self.restore_recovery(rec))

    def restore_recovery(self, rec):
        try:
            project = rec.load()
        except WorkbenchError as err:
            self.show_error(str(err))
            return
        self.set_project(project)
        self._update_title()
        self._after_open()

    # ---- export ----
    def _need_result(self):
        result = self.current_result()
        if result is None:
            self.show_error("there is no result to export; run an analysis first.")
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
        start = str(Path(self._start_dir()) / f"{result.name}.png")
        dialog = ExportFigureDialog(result, self.figure_context(result), start, self)
        dialog.accepted.connect(lambda: self.statusBar().showMessage(f"exported {dialog.written}", 5000))
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
            render_figure(result, fmt, path, context=self.figure_context(result))
        except (WorkbenchError, ValueError) as err:
            self.show_error(str(err))
            return False
        self.statusBar().showMessage(f"exported {path}", 5000)
        return True

    def export_data_dialog(self):
        result = self._need_result()
        if result is None:
            return
        start = str(Path(self._start_dir()) / f"{result.name}.csv")
        path, chosen = QFileDialog.getSaveFileName(self, "Export data", start, DATA_FILTERS)
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
            self.show_error(str(err))
            return False
        self.statusBar().showMessage(f"exported {path}", 5000)
        return True

    def export_experiment_dialog(self):
        start = str(Path(self._start_dir()) / "experiment.json")
        path, _ = QFileDialog.getSaveFileName(self, "Export experiment", start, "Experiment files (*.json)")
        if path:
            self.export_experiment(path)

    def export_experiment(self, path) -> bool:
        """The session as an experiment file: model, prompts and every analysis, runnable headless."""
        from desktop_app.project.experiment import Experiment, save_experiment

        if self.project.model is None:
            self.show_error("there is no model in this session yet; load one before exporting the experiment.")
            return False
        try:
            save_experiment(Experiment(model=self.project.model, prompts=self.project.prompts,
                                       analyses=[e.spec for e in self.project.analyses]), path)
        except WorkbenchError as err:
            self.show_error(str(err))
            return False
        self.statusBar().showMessage(f"exported {path}; run it with: interp-workbench run {path} --out …", 8000)
        return True

    def copy_figure(self) -> bool:
        from desktop_app.ui.figure import figure_image

        result = self._need_result()
        if result is None:
            return False
        QGuiApplication.clipboard().setImage(figure_image(result, context=self.figure_context(result)))
        self.statusBar().showMessage("figure copied to the clipboard", 5000)
        return True
