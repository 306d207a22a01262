"""The main window: docks for model, prompts, layer tree and analysis around the result pane.

The window only paints and routes: every computation goes to the runner thread as a job from worker_jobs,
and every edit goes through the project document (project.document.Project) and its undo stack.
"""
from __future__ import annotations

from PySide6.QtCore import QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (QDockWidget, QLabel, QMainWindow, QMenu, QMessageBox, QScrollArea,
                               QSplitter, QTabBar, QVBoxLayout, QWidget)

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import recent as recent_mod
from desktop_app.project.document import Project
from desktop_app.project.specs import ModelRef
from desktop_app.project.undo import UndoStack
from desktop_app.ui import worker_jobs
from desktop_app.ui.analysis_controller import AnalysisMixin
from desktop_app.ui.file_ops import FileOpsMixin
from desktop_app.ui.model_controller import ModelMixin
from desktop_app.ui.panels import AnalysisPanel, LayerTreePanel, MessageBar, ModelPanel, PromptsPanel
from desktop_app.ui.plots import ResultView
from desktop_app.ui.runner import Runner
from desktop_app.ui.sae_controller import SAEMixin
from desktop_app.ui.sae_panel import SAEFeatureView
from desktop_app.ui.training_view import TrainingView

TOKENIZE_DEBOUNCE_MS = 150


class MainWindow(ModelMixin, AnalysisMixin, SAEMixin, FileOpsMixin, QMainWindow):
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
        self.predictions: worker_jobs.Predictions | None = None
        self._build_ui()
        self._build_actions()
        self._connect_runner()
        self._init_file_ops()
        self._init_sae()
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
        self.predictions_label = QLabel("Click a heatmap cell to see the top next tokens of the clean, corrupted "
                                        "and patched runs.")
        self.predictions_label.setObjectName("cellPredictionsLabel")
        self.predictions_label.setToolTip("Top-5 next tokens of the clean, corrupted and patched runs of the "
                                          "clicked cell")
        self.predictions_label.setWordWrap(True)
        self.predictions_label.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.predictions_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.predictions_label.setMargin(6)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.predictions_label)
        scroll.setMinimumWidth(150)
        split = QSplitter(Qt.Horizontal)
        split.setObjectName("resultSplitter")
        split.addWidget(self.result_view)
        split.addWidget(scroll)
        split.setStretchFactor(0, 4)
        split.setStretchFactor(1, 1)
        split.setSizes([800, 200])
        central = QWidget()
        lay = QVBoxLayout(central)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.addWidget(self.message_bar)
        lay.addWidget(self.result_tabs)
        lay.addWidget(split, 1)
        self.setCentralWidget(central)

        self.model_panel = ModelPanel()
        self.prompts_panel = PromptsPanel()
        self.layer_panel = LayerTreePanel()
        self.analysis_panel = AnalysisPanel()
        self.sae_view = SAEFeatureView()
        self.sae_view.setToolTip("SAE features of the attached hook point on the clean prompt")
        self.training_view = TrainingView()
        self.docks = {}
        for name, title, widget, area in (
                ("modelDock", "Model", self.model_panel, Qt.LeftDockWidgetArea),
                ("layerDock", "Layers", self.layer_panel, Qt.LeftDockWidgetArea),
                ("promptsDock", "Prompts", self.prompts_panel, Qt.TopDockWidgetArea),
                ("analysisDock", "Analysis", self.analysis_panel, Qt.RightDockWidgetArea),
                ("saeDock", "SAE features", self.sae_view, Qt.RightDockWidgetArea),
                ("trainDock", "SAE training", self.training_view, Qt.BottomDockWidgetArea)):
            dock = QDockWidget(title, self)
            dock.setObjectName(name)
            dock.setWidget(widget)
            self.addDockWidget(area, dock)
            self.docks[name] = dock
        self.docks["saeDock"].hide()
        self.docks["trainDock"].hide()
        self.tabifyDockWidget(self.docks["analysisDock"], self.docks["saeDock"])
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
        self.layer_panel.tree.itemDoubleClicked.connect(self._tree_item_opened)
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
        self.act_export_experiment = self._action(
            "Export e&xperiment…", self.export_experiment_dialog, None,
            "Write this session as an experiment file that 'interp-workbench run' executes", "actionExportExperiment")
        self.act_copy = self._action("&Copy figure", self.copy_figure, QKeySequence("Ctrl+Shift+C"),
                                     "Copy the current result's figure to the clipboard", "actionCopyFigure")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.Quit, name="actionQuit")
        for act in (self.act_new, self.act_open):
            f.addAction(act)
        f.addMenu(self.recent_menu)
        for act in (self.act_open_model, None, self.act_save, self.act_save_as, None, self.act_export,
                    self.act_export_data, self.act_export_experiment, self.act_copy, None, self.act_quit):
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
        s = mb.addMenu("S&AE")
        self.act_attach_sae = self._action("&Attach SAE…", lambda: self.attach_sae_dialog(), None,
                                           "Attach an SAE to the hook point selected in the Layers tree",
                                           "actionAttachSae")
        self.act_dashboards = self._action("Build &dashboards…", self.build_dashboards_dialog, None,
                                           "Build feature dashboards of the attached SAE over a corpus",
                                           "actionBuildDashboards")
        self.act_train_sae = self._action("&Train SAE…", lambda: self.train_sae_dialog(), None,
                                          "Train an SAE on a hook point's activations over a corpus",
                                          "actionTrainSae")
        for act in (self.act_attach_sae, self.act_dashboards, self.act_train_sae):
            s.addAction(act)
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
