"""The main window: docks for model, prompts, layer tree and analysis around the result pane.

The window only paints and routes: every computation goes to the runner thread as a job from worker_jobs,
and every edit goes through the project document (project.document.Project) and its undo stack.
The widgets are built by ui.window_layout, the menus and shortcuts by ui.window_menus; the methods here are
mostly thin delegations to the controllers, kept because scripts and tests call them on the window.
"""
from __future__ import annotations

from types import SimpleNamespace

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow, QMessageBox

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import recent as recent_mod
from desktop_app.project.session import Session
from desktop_app.project.specs import ModelRef
from desktop_app.ui import kind_views, window_layout, window_menus, worker_jobs
from desktop_app.ui.analysis_controller import AnalysisController, JobRouter
from desktop_app.ui.dataset_table import DatasetController
from desktop_app.ui.file_ops import FileController
from desktop_app.ui.model_controller import ModelController, PromptsController, StatusLabels
from desktop_app.ui.runner import Runner
from desktop_app.ui.sae_controller import SAEController
from desktop_app.ui.transcoder_trainer import TranscoderTrainer


class MainWindow(QMainWindow):
    analysis_ended = Signal(str)  # "done", "cancelled" or "failed", after the result is shown

    def __init__(self, settings: QSettings | None = None):
        super().__init__()
        self.setObjectName("mainWindow")
        self.settings = settings or QSettings(str(recent_mod.config_dir() / "window.ini"), QSettings.IniFormat)
        self.confirm_dialogs = True  # scripts and tests set False: unsaved changes are then discarded silently
        self.runner = Runner(self)
        self.session = Session()  # the Qt-free state: document, undo stack, loaded model, selection, running
        self._unsubscribe = self.session.subscribe(self._on_session_event)
        window_layout.build_window_layout(self)
        self.jobs = JobRouter(self.runner, lambda: self.job_label.setText("idle"))
        self._submit = self.jobs.submit
        messages = SimpleNamespace(show_error=self.show_error, show_message=self.show_message,
                                   clear=self.message_bar.clear)
        self.model_ctl = ModelController(
            self.session, self._submit, self.runner.cancel_slot, self.model_panel, self.layer_panel,
            StatusLabels(self.device_label, self.memory_label, self.job_label), messages,
            on_loaded=[self.request_tokens, self.restore_saes, lambda: self.dataset_ctl.refresh(model_changed=True),
                       lambda: self.metric_assist and self.metric_assist.load_vocabulary()],
            on_unloaded=[self.prompts_panel.clear_chips, lambda: self.dataset_ctl.refresh(model_changed=True),
                         lambda: self.metric_assist and self.metric_assist.model_unloaded()],
            dialog_parent=self)
        self.prompt_ctl = PromptsController(self.session, self.prompts_panel, self._submit,
                                            lambda: self.model_ctl.loaded is not None, self)
        self.dataset_ctl = DatasetController(self.session, self.dataset_panel, self._submit,
                                             lambda: self.model_ctl.loaded is not None, messages,
                                             self.open_template_dialog, self)
        window_menus.build_menus(self)
        self._shortcuts_win = window_menus.WindowShortcuts(self)
        QApplication.instance().installEventFilter(self._shortcuts_win)
        self.analysis_ctl = AnalysisController(
            self.session, self.runner, self._submit, lambda: self.model_ctl.loaded, self.analysis_panel,
            self.result_view, self.predictions_label, messages, self.job_label,
            lambda text, ms: self.statusBar().showMessage(text, ms), self.sae_view, self._show_sae_dock,
            self.analysis_ended.emit, lambda result, record: kind_views.show_detail(self, result, record))
        self.layer_panel.patch_here.connect(self.analysis_ctl.patch_here)
        self.layer_panel.tree.itemDoubleClicked.connect(self.analysis_ctl.open_tree_item)
        self.file_ctl = FileController(
            self.session, self, messages, lambda text, ms: self.statusBar().showMessage(text, ms), self.model_ctl,
            self._stop_analyses, self._show_project, self._update_title, self.current_result,
            lambda: self.confirm_dialogs, self.result_view.figure_selection)
        self.metric_assist = window_layout.metric_field_assist(self.analysis_panel, self._submit,
                                                               lambda: self.project.prompts)
        self.result_view.cell_clicked.connect(self._pair_bars_for_cell)
        self.sae_ctl = SAEController(
            self.session, self._submit, self.runner.cancel_slot, lambda: self.model_ctl.loaded, self.sae_view,
            self.training_view, self.docks["saeDock"], self.docks["trainDock"], self.resizeDocks, self.layer_panel,
            self.analysis_panel, messages, self.job_label, self.run_analysis, self.file_ctl.start_dir, self,
            run_spec=self.analysis_ctl.run_spec)
        self.transcoder_trainer = TranscoderTrainer(
            lambda: self.model_ctl.loaded, self.analysis_ctl.run_spec, lambda: self.project, self.training_view,
            self.docks["trainDock"], self.resizeDocks, messages, self.job_label, self.file_ctl.start_dir, self)
        self._restore_layout()
        self._update_title()

    @property
    def project(self):
        return self.session.project

    # ---- the Model and Prompts controllers, as scripts and tests call them on the window
    @property
    def model_loaded(self) -> worker_jobs.ModelLoaded | None:
        return self.model_ctl.loaded

    @property
    def loaded_ref(self) -> ModelRef | None:
        return self.model_ctl.ref

    def load_model(self):
        self.model_ctl.load()

    def unload_model(self):
        self.model_ctl.unload()

    def browse_model(self, gguf: bool = False):
        self.model_ctl.browse(gguf)

    def request_tokens(self):
        self.prompt_ctl.request_tokens()

    def _pair_bars_for_cell(self, cell, _value=None):
        """A clicked cell of a result over a dataset: every pair's clean / corrupted / patched metric there."""
        view = self.result_view
        per_pair = view.per_pair()
        if per_pair is None:
            return
        patched = [view.shown_of(per_pair[i])[tuple(cell)] for i in range(per_pair.shape[0])]
        where = view.describe(cell).split(":")[0]
        self.pair_bars.show_cell(view.result, where, patched)
        dock = self.docks["pairBarsDock"]
        if not dock.isVisible():
            dock.show()
            self.resizeDocks([dock], [240], Qt.Vertical)

    def open_template_dialog(self):
        """The template generator (`templateDialog`); Generate replaces the dataset as one undoable edit."""
        from desktop_app.project.dataset_edit import replace_all
        from desktop_app.ui.template_dialog import TemplateDialog

        dialog = TemplateDialog(self)
        dialog.setAttribute(Qt.WA_DeleteOnClose)
        dialog.accepted.connect(lambda: self.session.push(replace_all(
            self.project, dialog.generated, f"Generate {len(dialog.generated)} {dialog.family()} pairs")))
        dialog.open()
        return dialog

    def _sync_prompts_to_edits(self):
        self.prompt_ctl.sync_to_edits()

    # ---- the File menu's controller
    def set_project(self, project):
        self.file_ctl.set_project(project)

    def new_project(self):
        self.file_ctl.new_project()

    def open_project_dialog(self):
        self.file_ctl.open_project_dialog()

    def open_project(self, path, confirmed: bool = False) -> bool:
        return self.file_ctl.open_project(path, confirmed)

    def _after_open(self):
        self.file_ctl.after_open()

    def save(self) -> bool:
        return self.file_ctl.save()

    def save_as(self) -> bool:
        return self.file_ctl.save_as()

    def save_to(self, path) -> bool:
        return self.file_ctl.save_to(path)

    def confirm_discard(self, what: str) -> bool:
        return self.file_ctl.confirm_discard(what)

    def _fill_recent_menu(self):
        self.file_ctl.fill_recent_menu(self.recent_menu)

    @property
    def recent(self):
        return self.file_ctl.recent

    @property
    def autosave_timer(self):
        return self.file_ctl.autosave_timer

    def autosave_now(self):
        self.file_ctl.autosave_now()

    def discard_autosave(self):
        self.file_ctl.discard_autosave()

    def offer_recovery(self):
        self.file_ctl.offer_recovery()

    def restore_recovery(self, rec):
        self.file_ctl.restore_recovery(rec)

    def figure_context(self, result) -> list[str]:
        return self.file_ctl.figure_context(result)

    @property
    def export_dialog(self):
        return self.file_ctl.export_dialog

    def export_figure_dialog(self):
        return self.file_ctl.export_figure_dialog()

    def export_figure(self, path, fmt: str | None = None) -> bool:
        return self.file_ctl.export_figure(path, fmt)

    def export_data_dialog(self):
        self.file_ctl.export_data_dialog()

    def export_data(self, path) -> bool:
        return self.file_ctl.export_data(path)

    def export_experiment_dialog(self):
        self.file_ctl.export_experiment_dialog()

    def export_experiment(self, path) -> bool:
        return self.file_ctl.export_experiment(path)

    def copy_figure(self) -> bool:
        return self.file_ctl.copy_figure()

    def _model_name_of(self, result) -> str:
        """"model NAME" of the model `result` was computed with (the title of the result pane names it)."""
        if not hasattr(self, "file_ctl"):
            return ""
        context = self.file_ctl.figure_context(result)
        return context[0] if context and context[0].startswith("model ") else ""

    def _stop_analyses(self):
        self.runner.cancel_slot("analysis")
        self.analysis_ctl.run_queue = []

    def _show_project(self, project):
        """The panes take a new document (FileController.set_project; it then selects an analysis)."""
        self.undo_stack.subscribe(self._undo_changed)
        self._undo_changed(self.undo_stack)
        self.act_shared_scale.setChecked(bool(project.view("shared_colour_scale", False)))
        self._sync_prompts_to_edits()
        if project.analyses:
            self.analysis_panel.show_spec(project.analyses[0].spec)
        self.result_view.set_result(None)
        self.token_timer.start()

    # ---- the analysis controller
    def run_analysis(self):
        self.analysis_ctl.run_analysis()

    def run_named(self, name: str):
        self.analysis_ctl.run_named(name)

    def run_all(self):
        self.analysis_ctl.run_all()

    def cancel_analysis(self):
        self.analysis_ctl.cancel_analysis()

    def keep_partial_run(self):
        self.analysis_ctl.keep_partial_run()

    def spec_from_panel(self):
        return self.analysis_ctl.spec_from_panel()

    def current_result(self) -> AnalysisResult | None:
        return self.analysis_ctl.current_result()

    def set_shared_colour_scale(self, on: bool):
        self.analysis_ctl.set_shared_colour_scale(on)

    def _cell_clicked(self, cell, value=None):
        self.analysis_ctl.cell_clicked(cell, value)

    def _show_selected(self):
        self.analysis_ctl._show_selected()

    @property
    def _run_job(self) -> int | None:
        return self.analysis_ctl.run_job

    @property
    def predictions(self):
        return self.analysis_ctl.predictions

    @predictions.setter
    def predictions(self, value):
        self.analysis_ctl.predictions = value

    def _show_sae_dock(self):
        dock = self.docks["saeDock"]
        if not dock.isVisible():
            dock.show()
            # the feature heatmap needs the room (after the dock is laid out, or Qt ignores it)
            QTimer.singleShot(0, lambda: self.resizeDocks([dock], [400], Qt.Horizontal))

    # ---- the SAE controller
    @property
    def sae_attached(self):
        return self.sae_ctl.sae_attached

    def attach_sae(self, path, hook: str, restore: bool = False):
        return self.sae_ctl.attach_sae(path, hook, restore)

    def attach_sae_dialog(self, hook: str | None = None):
        self.sae_ctl.attach_sae_dialog(hook)

    def build_dashboards(self, corpus_path):
        return self.sae_ctl.build_dashboards(corpus_path)

    def build_dashboards_dialog(self):
        self.sae_ctl.build_dashboards_dialog()

    def build_metrics(self, corpus_path, max_texts: int = 200):
        return self.sae_ctl.build_metrics(corpus_path, max_texts)

    def train_sae(self, hook: str, corpus, out_folder, **settings):
        return self.sae_ctl.train_sae(hook, corpus, out_folder, **settings)

    def train_sae_dialog(self, hook: str | None = None):
        self.sae_ctl.train_sae_dialog(hook)

    def train_transcoders(self, corpus, out_folder, **settings):
        return self.transcoder_trainer.train(corpus, out_folder, **settings)

    def train_transcoders_dialog(self):
        self.transcoder_trainer.dialog()

    def restore_saes(self):
        self.sae_ctl.restore_saes()

    @property
    def token_timer(self):
        return self.prompt_ctl.timer

    @property
    def token_problems(self) -> list[str]:
        return self.prompt_ctl.token_problems

    @property
    def undo_stack(self):
        return self.session.undo

    def _undo_changed(self, stack):
        self.act_undo.setEnabled(stack.can_undo())
        self.act_redo.setEnabled(stack.can_redo())
        self.act_undo.setText(f"&Undo {stack.undo_text()}".strip())
        self.act_redo.setText(f"&Redo {stack.redo_text()}".strip())

    # ------------------------------------------------------------------ layout
    def _restore_layout(self):
        self.resize(1280, 820)
        self._default_state = self.saveState()
        geometry, state = self.settings.value("geometry"), self.settings.value("windowState")
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)

    def save_layout(self):
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("windowState", self.saveState())
        self.settings.sync()

    def reset_layout(self):
        self.restoreState(self._default_state)

    # ------------------------------------------------------------------ messages, title, project events
    def show_error(self, message: str, details: str = ""):
        self.message_bar.show_message(message, "error", details)

    def show_message(self, message: str, level: str = "info", action_text: str = "", action=None):
        self.message_bar.show_message(message, level, "", action_text, action)

    def _on_session_event(self, session, event, detail):
        if event == "document":
            self._on_project_event(session.project, *detail)
        elif event == "selected":
            self._show_selected()
        elif event == "loaded":
            self._show_selected()

    def _on_project_event(self, project, event, detail):
        if event == "prompts":
            self._sync_prompts_to_edits()
            self.dataset_ctl.refresh()
            if getattr(self, "metric_assist", None) is not None:
                self.metric_assist.prompts_changed()
            self.token_timer.start()
        elif event in ("model", "spec", "analyses") and self.session.selected is not None:
            self._show_selected()
        elif event == "view" and detail == "shared_colour_scale":
            self.act_shared_scale.setChecked(bool(project.view("shared_colour_scale", False)))
            self._show_selected()
        self._update_title()

    def _hooks_checked(self, names):
        from desktop_app.project.undo import SetViewValue

        if self.project.view("selected_hooks", []) != names:
            self.undo_stack.push(SetViewValue(self.project, "selected_hooks", names or None, "Select hook points"))

    def _update_title(self):
        name = self.project.path.stem if self.project.path else "Untitled"
        self.setWindowTitle(f"{name}[*] — Interp Workbench")
        self.setWindowModified(self.project.dirty)

    def closeEvent(self, event):
        if self._run_job is not None:
            if not self.confirm_close_while_running():
                event.ignore()
                return
        elif not self.confirm_discard("close"):
            event.ignore()
            return
        self.autosave_timer.stop()
        self.save_layout()
        self.runner.shutdown()
        self.discard_autosave()
        QApplication.instance().removeEventFilter(self._shortcuts_win)
        self._unsubscribe()
        event.accept()

    def confirm_close_while_running(self) -> bool:
        """Closing during a run: say so; Save keeps the finished cells (status partial) in the project file."""
        running = self.session.running or "an analysis"
        if not self.confirm_dialogs:
            return True
        answer = QMessageBox.question(
            self, "A run is in progress",
            f"{running} is still running. Save the project with the cells finished so far (marked partial), "
            f"close without saving, or keep working?",
            QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
        if answer == QMessageBox.Cancel:
            return False
        if answer == QMessageBox.Save:
            self.keep_partial_run()
            return self.save()
        return True

