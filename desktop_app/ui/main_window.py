"""The main window: docks for model, prompts, layer tree and analysis around the result pane.

The window only paints and routes: every computation goes to the runner thread as a job from worker_jobs,
and every edit goes through the project document (project.document.Project) and its undo stack.
"""
from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QLabel, QMainWindow, QMenu, QMessageBox, QTabBar, QVBoxLayout,
                               QWidget)

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import recent as recent_mod
from desktop_app.project.document import Project
from desktop_app.project.specs import (AblationSpec, ActivationPatchingSpec, AttributionPatchingSpec,
                                       CausalTracingSpec, ModelRef, Prompts)
from desktop_app.project.undo import SetPromptField, UndoStack
from desktop_app.ui import worker_jobs
from desktop_app.ui.file_ops import FileOpsMixin
from desktop_app.ui.panels import (HOOK_COMPONENT, AnalysisPanel, LayerTreePanel, MessageBar, ModelPanel,
                                   PromptsPanel)
from desktop_app.ui.plots import ResultView
from desktop_app.ui.runner import Runner

TOKENIZE_DEBOUNCE_MS = 150
_KIND_SHORT = {"activation_patching": "patching", "attribution_patching": "attribution",
               "causal_tracing": "tracing", "ablation": "ablation"}


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class MainWindow(FileOpsMixin, QMainWindow):
    analysis_ended = Signal(str)  # "done", "cancelled" or "failed", after the result is shown

    def __init__(self, settings: QSettings | None = None):
        super().__init__()
        self.setObjectName("mainWindow")
        self.settings = settings or QSettings(str(recent_mod.config_dir() / "window.ini"), QSettings.IniFormat)
        self.confirm_dialogs = True  # scripts and tests set False: unsaved changes are then discarded silently
        self.runner = Runner(self)
        self.project = Project()
        self.undo_stack = UndoStack(self.project)
        self._unsubscribe = self.project.subscribe(self._on_project_event)
        self.model_loaded: worker_jobs.ModelLoaded | None = None
        self.loaded_ref: ModelRef | None = None
        self._handlers: dict[int, dict] = {}
        self._syncing = False
        self._run_job: int | None = None
        self._run_name = ""
        self._run_t0 = 0.0
        self._streaming: AnalysisResult | None = None
        self._build_ui()
        self._build_actions()
        self._connect_runner()
        self._init_file_ops()
        self._restore_layout()
        self._update_title()

    # ------------------------------------------------------------------ construction
    def _build_ui(self):
        self.message_bar = MessageBar()
        self.result_tabs = QTabBar()
        self.result_tabs.setObjectName("resultTabs")
        self.result_tabs.setToolTip("Results of this project; click one to show it")
        self.result_tabs.setExpanding(False)
        self.result_tabs.currentChanged.connect(self._tab_changed)
        self.result_view = ResultView()
        self.result_view.setObjectName("heatmapView")
        self.result_view.setToolTip("The current result; hover a cell for its value, click to select it")
        self.result_view.cell_clicked.connect(self._cell_clicked)
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.message_bar)
        lay.addWidget(self.result_tabs)
        lay.addWidget(self.result_view, 1)
        self.setCentralWidget(central)

        self.model_panel = ModelPanel()
        self.prompts_panel = PromptsPanel()
        self.layer_panel = LayerTreePanel()
        self.analysis_panel = AnalysisPanel()
        self.sae_view = QLabel("Attach an SAE to a hook point to see its features here.")
        self.sae_view.setObjectName("saeFeatureView")
        self.sae_view.setToolTip("SAE features of the selected hook point")
        self.sae_view.setAlignment(Qt.AlignCenter)
        self.docks = {}
        for name, title, widget, area in (
                ("modelDock", "Model", self.model_panel, Qt.LeftDockWidgetArea),
                ("layerDock", "Layers", self.layer_panel, Qt.LeftDockWidgetArea),
                ("promptsDock", "Prompts", self.prompts_panel, Qt.TopDockWidgetArea),
                ("analysisDock", "Analysis", self.analysis_panel, Qt.RightDockWidgetArea),
                ("saeDock", "SAE features", self.sae_view, Qt.RightDockWidgetArea)):
            dock = QDockWidget(title, self)
            dock.setObjectName(name)
            dock.setWidget(widget)
            self.addDockWidget(area, dock)
            self.docks[name] = dock
        self.docks["saeDock"].hide()
        self.resizeDocks([self.docks["promptsDock"]], [190], Qt.Vertical)
        self.resizeDocks([self.docks["modelDock"], self.docks["analysisDock"]], [300, 300], Qt.Horizontal)

        sb = self.statusBar()
        sb.setObjectName("statusBar")
        self.device_label = QLabel("no model")
        self.device_label.setToolTip("Where the model runs")
        self.memory_label = QLabel("")
        self.memory_label.setToolTip("Memory used by the model's weights")
        self.job_label = QLabel("idle")
        self.job_label.setObjectName("jobStateLabel")
        self.job_label.setToolTip("What the worker thread is doing")
        for w in (self.device_label, self.memory_label, self.job_label):
            sb.addPermanentWidget(w)

        m, p, a = self.model_panel, self.prompts_panel, self.analysis_panel
        m.load_button.clicked.connect(self.load_model)
        m.unload_button.clicked.connect(self.unload_model)
        m.path_edit.returnPressed.connect(self.load_model)
        m.browse_button.clicked.connect(lambda: self.browse_model(gguf=False))
        m.browse_gguf_button.clicked.connect(lambda: self.browse_model(gguf=True))
        for field, edit in p.edits().items():
            edit.textChanged.connect(lambda text, f=field: self._prompt_edited(f, text))
        a.run_button.clicked.connect(self.run_analysis)
        a.cancel_button.clicked.connect(self.cancel_analysis)
        self.layer_panel.patch_here.connect(self._patch_here)
        self.layer_panel.checked_changed.connect(lambda names: self.project.set_view("selected_hooks", names))
        self.token_timer = QTimer(self)
        self.token_timer.setSingleShot(True)
        self.token_timer.setInterval(TOKENIZE_DEBOUNCE_MS)
        self.token_timer.timeout.connect(self.request_tokens)

    def _action(self, text, slot, shortcut=None, tip="", name=""):
        act = QAction(text, self)
        if shortcut:
            act.setShortcuts(shortcut if isinstance(shortcut, list) else [shortcut])
        act.setToolTip(tip or text)
        act.setStatusTip(tip or text)
        if name:
            act.setObjectName(name)
        act.triggered.connect(slot)
        self.addAction(act)
        return act

    def _build_actions(self):
        mb = self.menuBar()
        f = mb.addMenu("&File")
        self.act_new = self._action("&New project", self.new_project, QKeySequence.New, name="actionNew")
        self.act_open = self._action("&Open project…", self.open_project_dialog, QKeySequence("Ctrl+Shift+O"),
                                     name="actionOpenProject")
        self.act_open_model = self._action("Open &model…", lambda: self.browse_model(False), QKeySequence.Open,
                                           "Choose a model folder and load it", "actionOpenModel")
        self.recent_menu = QMenu("Open &recent", self)
        self.recent_menu.setObjectName("recentMenu")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        self.act_save = self._action("&Save", self.save, QKeySequence.Save, name="actionSave")
        self.act_save_as = self._action("Save &as…", self.save_as, QKeySequence.SaveAs, name="actionSaveAs")
        self.act_export = self._action("&Export figure…", self.export_figure_dialog, QKeySequence("Ctrl+E"),
                                       "Write the current result as PNG, SVG or PDF", "actionExportFigure")
        self.act_export_data = self._action("Export &data…", self.export_data_dialog, None,
                                            "Write the current result as CSV or NPZ", "actionExportData")
        self.act_copy = self._action("&Copy figure", self.copy_figure, QKeySequence("Ctrl+Shift+C"),
                                     "Copy the current result's figure to the clipboard", "actionCopyFigure")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.Quit, name="actionQuit")
        for act in (self.act_new, self.act_open):
            f.addAction(act)
        f.addMenu(self.recent_menu)
        for act in (self.act_open_model, None, self.act_save, self.act_save_as, None, self.act_export,
                    self.act_export_data, self.act_copy, None, self.act_quit):
            f.addSeparator() if act is None else f.addAction(act)
        e = mb.addMenu("&Edit")
        self.act_undo = self._action("&Undo", lambda: self.undo_stack.undo(), QKeySequence.Undo, name="actionUndo")
        self.act_redo = self._action("&Redo", lambda: self.undo_stack.redo(), QKeySequence.Redo, name="actionRedo")
        e.addAction(self.act_undo)
        e.addAction(self.act_redo)
        self.undo_stack.subscribe(self._undo_changed)
        self._undo_changed(self.undo_stack)
        r = mb.addMenu("&Analysis")
        self.act_run = self._action("&Run", self.run_analysis, [QKeySequence("Ctrl+R"), QKeySequence("F5")],
                                    "Run the analysis (Ctrl+R, F5)", "actionRun")
        self.act_cancel = self._action("&Cancel", self.cancel_analysis, QKeySequence("Esc"),
                                       "Cancel the running job, keeping finished cells (Esc)", "actionCancel")
        r.addAction(self.act_run)
        r.addAction(self.act_cancel)
        v = mb.addMenu("&View")
        for dock in self.docks.values():
            v.addAction(dock.toggleViewAction())
        v.addSeparator()
        v.addAction(self._action("Reset &layout", self.reset_layout, name="actionResetLayout"))

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

    # ------------------------------------------------------------------ runner plumbing
    def _connect_runner(self):
        r = self.runner
        r.progressed.connect(lambda j, d, t, m: self._dispatch(j, "progress", d, t, m))
        r.partial.connect(lambda j, i, v: self._dispatch(j, "partial", i, v))
        r.noted.connect(lambda j, e: self._dispatch(j, "note", e))
        r.finished.connect(lambda j, v: self._dispatch(j, "finished", v, final=True))
        r.errored.connect(lambda j, m, d: self._dispatch(j, "errored", m, d, final=True))
        r.cancelled.connect(lambda j, v: self._dispatch(j, "cancelled", v, final=True))
        r.busy_changed.connect(self._busy_changed)

    def _submit(self, fn, slot: str, **handlers) -> int:
        job_id = self.runner.submit(fn, slot)
        self._handlers[job_id] = handlers
        return job_id

    def _dispatch(self, job_id, event, *args, final=False):
        handlers = self._handlers.pop(job_id, None) if final else self._handlers.get(job_id)
        if handlers and event in handlers:
            handlers[event](*args)

    def _busy_changed(self, busy: bool):
        if not busy:
            self.job_label.setText("idle")

    # ------------------------------------------------------------------ model
    def model_ref_from_panel(self) -> ModelRef | None:
        m = self.model_panel
        path = m.path_edit.text().strip()
        if not path:
            return None
        return ModelRef(path=path, dtype=m.dtype_combo.currentText(), device=m.device_combo.currentText().strip()
                        or "auto", trust_remote_code=m.trust_check.isChecked())

    def load_model(self):
        try:
            ref = self.model_ref_from_panel()
        except Exception as err:  # noqa: BLE001 - a SpecError from a bad device string
            self.show_error(str(err))
            return
        if ref is None:
            self.show_error("no model path is given; type a model folder or .gguf file, or click Folder….")
            return
        self.runner.cancel_slot("analysis")
        m = self.model_panel
        m.progress.setValue(0)
        m.load_button.setEnabled(False)
        self.message_bar.clear()
        self.job_label.setText("loading model")
        job = worker_jobs.load_model(ref.path, ref.dtype, ref.device, ref.trust_remote_code)
        self._submit(job, "model",
                     progress=lambda d, t, msg: (m.progress.setMaximum(max(t, 1)), m.progress.setValue(d),
                                                 m.progress.setFormat(f"{msg} %p%")),
                     finished=lambda info: self._model_loaded(ref, info),
                     errored=self._model_failed, cancelled=lambda _v: self._model_failed("loading was cancelled"))

    def _model_loaded(self, ref: ModelRef, info: worker_jobs.ModelLoaded):
        m = self.model_panel
        m.load_button.setEnabled(True)
        m.unload_button.setEnabled(True)
        m.progress.setValue(m.progress.maximum())
        m.progress.setFormat("loaded")
        m.summary.setText(info.summary)
        self.model_loaded = info
        self.loaded_ref = ModelRef(ref.path, ref.dtype, ref.device, ref.trust_remote_code, info.config_hash)
        self.project.set_model(self.loaded_ref)
        self.layer_panel.set_tree(info.tree, self.project.view("selected_hooks", []))
        self.device_label.setText(f"device: {info.device}")
        self.memory_label.setText(f"weights: {human_bytes(info.memory_bytes)}")
        self.job_label.setText("model loaded")
        self.request_tokens()

    def _model_failed(self, message: str, details: str = ""):
        m = self.model_panel
        m.load_button.setEnabled(True)
        m.progress.setValue(0)
        m.progress.setFormat("not loaded")
        self.job_label.setText("load failed")
        self.show_error(message, details)

    def unload_model(self):
        self.runner.cancel_slot("analysis")
        self._submit(worker_jobs.unload_model(), "model", finished=lambda _v: self._unloaded())

    def _unloaded(self):
        self.model_loaded = self.loaded_ref = None
        self.model_panel.summary.setText("No model loaded.")
        self.model_panel.unload_button.setEnabled(False)
        self.model_panel.progress.setValue(0)
        self.layer_panel.set_tree(None)
        self.prompts_panel.clear_chips()
        self.device_label.setText("no model")
        self.memory_label.setText("")

    def browse_model(self, gguf: bool = False):
        start = self.model_panel.path_edit.text() or str(Path.home())
        if gguf:
            path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", start, "GGUF models (*.gguf)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Open a model folder", start)
        if path:
            self.model_panel.path_edit.setText(path)
            self.load_model()

    # ------------------------------------------------------------------ prompts and tokens
    def _prompt_edited(self, field: str, text: str):
        if self._syncing:
            return
        if getattr(self.project.prompts, field) != text:
            self.undo_stack.push(SetPromptField(self.project, field, text))
        self.token_timer.start()

    def _sync_prompts_to_edits(self):
        self._syncing = True
        try:
            for field, edit in self.prompts_panel.edits().items():
                value = getattr(self.project.prompts, field) or ""
                if edit.text() != value:
                    edit.setText(value)
        finally:
            self._syncing = False

    def request_tokens(self):
        if self.model_loaded is None:
            self.prompts_panel.clear_chips("load a model to see the tokens")
            return
        pr = self.project.prompts
        texts = {"clean": pr.clean, "corrupted": pr.corrupted, "answer": pr.answer, "wrong_answer": pr.wrong_answer}
        self._submit(worker_jobs.tokenize(texts, pr.prepend_bos), "tokenize", finished=self._show_tokens)

    def _show_tokens(self, tok: worker_jobs.Tokenized | None):
        p = self.prompts_panel
        if tok is None:
            return
        clean, corrupted = tok.tokens.get("clean", []), tok.tokens.get("corrupted", [])
        p.clean_chips.set_tokens(clean, tok.errors.get("clean", ""))
        note = tok.errors.get("corrupted", "")
        if clean and corrupted and len(clean) != len(corrupted):
            note = (f"the clean prompt is {len(clean)} tokens and the corrupted prompt {len(corrupted)}; "
                    "they must be the same length")
        p.corrupted_chips.set_tokens(corrupted, note)
        notes, parts = [], []
        for field, label in (("answer", "answer"), ("wrong_answer", "wrong answer")):
            pieces = tok.tokens.get(field)
            if pieces is None:
                continue
            parts.append((label, pieces))
            if len(pieces) != 1:
                notes.append(f"the {label} is {len(pieces)} tokens; it must be one")
        p.answer_chips.set_tokens([t for _, pieces in parts for t in pieces], "; ".join(notes),
                                  prefix="tokens: " if parts else "", positions=False)
        self.token_problems = [n for n in [note] + notes if n]

    # ------------------------------------------------------------------ analysis
    def spec_from_panel(self):
        a = self.analysis_panel
        kind, comp = a.kind(), a.component_combo.currentText()
        name = f"{comp} {_KIND_SHORT[kind]}" + (" (all positions)" if a.positions_combo.currentText() == "all"
                                                and kind != "causal_tracing" else "")
        common = dict(component=comp, positions=a.positions_combo.currentText(),
                      metric=a.metric_combo.currentText())
        if kind == "activation_patching":
            return ActivationPatchingSpec(name=name, direction=a.direction_combo.currentText(), **common)
        if kind == "attribution_patching":
            return AttributionPatchingSpec(name=name, direction=a.direction_combo.currentText(), **common)
        if kind == "causal_tracing":
            return CausalTracingSpec(name=name, subject=a.subject_edit.text(), component=comp)
        return AblationSpec(name=name, method=a.method_combo.currentText(), **common)

    def run_analysis(self):
        if self.model_loaded is None:
            self.show_error("no model is loaded; choose a model folder and click Load.")
            return
        try:
            spec = self.spec_from_panel()
        except Exception as err:  # noqa: BLE001 - SpecError: one sentence for the message bar
            self.show_error(str(err))
            return
        if spec.name in self.project.names():
            self.project.replace_spec(spec.name, spec)
        else:
            self.project.add_analysis(spec)
        self.message_bar.clear()
        a = self.analysis_panel
        self._run_name, self._run_t0, self._streaming = spec.name, time.perf_counter(), None
        a.set_running(True)
        a.progress.setRange(0, 1)
        a.progress.setValue(0)
        a.rate_label.setText("starting…")
        self.job_label.setText(f"running {spec.name}")
        job = worker_jobs.run_analysis(self.project.prompts, spec, a.batch_spin.value() or None)
        self._run_job = self._submit(job, "analysis", progress=self._run_progress, partial=self._run_partial,
                                     note=self._run_note, finished=self._run_finished, errored=self._run_errored,
                                     cancelled=self._run_cancelled)

    def cancel_analysis(self):
        if self._run_job is not None:
            self.runner.cancel(self._run_job)
            self.job_label.setText("cancelling")

    def _run_note(self, event):
        if isinstance(event, worker_jobs.Skeleton):
            self._streaming = event.result
            self._show_result(event.result)

    def _run_partial(self, index, values):
        if self._streaming is not None and self.result_view.result is self._streaming:
            self.result_view.update_cells(index, values)

    def _run_progress(self, done, total, message):
        a = self.analysis_panel
        a.progress.setRange(0, max(total, 1))
        a.progress.setValue(done)
        elapsed = time.perf_counter() - self._run_t0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            left = (total - done) / rate if rate > 0 else 0.0
            a.rate_label.setText(f"{done}/{total} cells · {rate:.0f} cells/s · {left:.0f} s left · {message}")
        else:
            a.rate_label.setText(message)

    def _run_ended(self, state: str):
        self._run_job = None
        self.analysis_panel.set_running(False)
        self.job_label.setText(state)
        QTimer.singleShot(0, lambda: self.analysis_ended.emit(state))  # after the handler stored the result

    def _run_finished(self, result: AnalysisResult):
        self._run_ended("done")
        self._store_result(result)
        a = self.analysis_panel
        a.progress.setValue(a.progress.maximum())
        a.rate_label.setText(f"{result.values.size} cells in {result.elapsed_s:.2f} s")
        if result.status == "failed":
            self.show_error(result.message or "the analysis failed.")
        elif result.message:
            self.show_message(result.message, "warning")

    def _run_cancelled(self, result):
        self._run_ended("cancelled")
        result = result if isinstance(result, AnalysisResult) else self._streaming
        if result is not None:
            if result.status == "complete":
                result.status = "partial"
            self._store_result(result)
            n = int((result.values == result.values).sum())
            self.show_message(f"cancelled: {n} of {result.values.size} cells were computed and are kept.",
                              "warning")
        else:
            self.show_message("cancelled before any cell was computed.", "warning")

    def _run_errored(self, message, details):
        self._run_ended("failed")
        kept = self._streaming
        if kept is not None and (kept.values == kept.values).any():
            self._store_result(kept)
            message += " The finished cells are kept."
        self.show_error(message, details)

    def _store_result(self, result: AnalysisResult):
        name = self._run_name if self._run_name in self.project.names() else result.name
        if name not in self.project.names():
            return
        self.project.set_result(name, result)
        self._streaming = None
        self._refresh_tabs(select=name)
        self.result_view.set_result(result)

    def _patch_here(self, hook: str, kind: str):
        a = self.analysis_panel
        a.kind_combo.setCurrentIndex(0)
        a.component_combo.setCurrentText(HOOK_COMPONENT[kind])
        self.run_analysis()

    def _cell_clicked(self, cell, value):
        self.statusBar().showMessage(self.result_view.describe(cell), 8000)

    # ------------------------------------------------------------------ results as tabs
    def _refresh_tabs(self, select: str | None = None):
        names = [e.name for e in self.project.analyses if e.result is not None]
        tabs = self.result_tabs
        tabs.blockSignals(True)
        while tabs.count():
            tabs.removeTab(0)
        for n in names:
            tabs.addTab(n)
        if select in names:
            tabs.setCurrentIndex(names.index(select))
        tabs.blockSignals(False)
        tabs.setVisible(bool(names))

    def _tab_changed(self, index: int):
        name = self.result_tabs.tabText(index) if index >= 0 else None
        if name and name in self.project.names():
            self.result_view.set_result(self.project.entry(name).result)

    def _show_result(self, result: AnalysisResult):
        self.result_view.set_result(result)

    def current_result(self) -> AnalysisResult | None:
        return self.result_view.result

    # ------------------------------------------------------------------ messages, title, project events
    def show_error(self, message: str, details: str = ""):
        self.message_bar.show_message(message, "error", details)

    def show_message(self, message: str, level: str = "info", action_text: str = "", action=None):
        self.message_bar.show_message(message, level, "", action_text, action)

    def _on_project_event(self, project, event, detail):
        if event == "prompts":
            self._sync_prompts_to_edits()
            self.token_timer.start()
        self._update_title()

    def _update_title(self):
        name = self.project.path.stem if self.project.path else "Untitled"
        self.setWindowTitle(f"{name}[*] — Interp Workbench")
        self.setWindowModified(self.project.dirty)

    def closeEvent(self, event):
        if not self.confirm_discard("close"):
            event.ignore()
            return
        self.autosave_timer.stop()
        self.save_layout()
        self.runner.shutdown()
        self.discard_autosave()
        self._unsubscribe()
        event.accept()

    def confirm_discard(self, what: str) -> bool:
        """True if the project may be replaced or closed (saved, not dirty, or the user agrees)."""
        if not self.project.dirty or not self.confirm_dialogs:
            return True
        answer = QMessageBox.question(self, "Unsaved changes", f"Save the changes to this project before you {what}?",
                                      QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel)
        if answer == QMessageBox.Save:
            return self.save()
        return answer == QMessageBox.Discard
