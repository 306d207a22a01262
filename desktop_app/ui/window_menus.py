"""The main window's menu bar, its actions (objectNames, texts and shortcuts that tests and users rely on) and
the filter that keeps the window's shortcuts working while a text field has the focus."""
from __future__ import annotations

from PySide6.QtCore import QEvent, QObject
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QLineEdit, QMenu, QPlainTextEdit

from desktop_app.ui import graph_import

WINDOW_KEYS = (QKeySequence("Ctrl+E"), QKeySequence("Ctrl+R"), QKeySequence("Ctrl+Shift+C"))


class WindowShortcuts(QObject):
    """A focused text field claims Ctrl+E (end of line) and friends for itself; these keys mean the window's
    actions (export, run, copy figure) everywhere in it, so the field's claim is declined."""

    def __init__(self, window):
        super().__init__(window)
        self.window = window

    def eventFilter(self, obj, event):
        if event.type() == QEvent.ShortcutOverride and isinstance(obj, (QLineEdit, QPlainTextEdit)) \
                and obj.window() is self.window:
            pressed = QKeySequence(event.keyCombination())
            if any(pressed.matches(k) == QKeySequence.ExactMatch for k in WINDOW_KEYS):
                event.ignore()
                return True
        return False


def add_action(window, text, slot, shortcut=None, tip="", name=""):
    """A QAction of `window` (so its shortcut works wherever the focus is in the window)."""
    act = QAction(text, window)
    if shortcut:
        act.setShortcuts(shortcut if isinstance(shortcut, list) else [shortcut])
    act.setToolTip(tip or text)
    act.setStatusTip(tip or text)
    if name:
        act.setObjectName(name)
    act.triggered.connect(slot)
    window.addAction(act)
    return act


def build_menus(window) -> None:
    """File, Edit, Analysis, SAE and View menus; each action is kept on the window as `act_*`."""
    mb = window.menuBar()
    _build_file_menu(window, mb.addMenu("&File"))
    e = mb.addMenu("&Edit")
    window.act_undo = add_action(window, "&Undo", lambda: window.undo_stack.undo(), QKeySequence.Undo,
                                 name="actionUndo")
    window.act_redo = add_action(window, "&Redo", lambda: window.undo_stack.redo(), QKeySequence.Redo,
                                 name="actionRedo")
    e.addAction(window.act_undo)
    e.addAction(window.act_redo)
    window.undo_stack.subscribe(window._undo_changed)
    window._undo_changed(window.undo_stack)
    r = mb.addMenu("&Analysis")
    window.act_run = add_action(window, "&Run", window.run_analysis, [QKeySequence("Ctrl+R"), QKeySequence("F5")],
                                "Run the analysis (Ctrl+R, F5)", "actionRun")
    window.act_cancel = add_action(window, "&Cancel", window.cancel_analysis, QKeySequence("Esc"),
                                   "Cancel the running job, keeping finished cells (Esc)", "actionCancel")
    r.addAction(window.act_run)
    r.addAction(window.act_cancel)
    _build_sae_menu(window, mb.addMenu("S&AE"))
    _build_view_menu(window, mb.addMenu("&View"))


def _build_file_menu(window, f: QMenu) -> None:
    window.act_new = add_action(window, "&New project", window.new_project, QKeySequence.New, name="actionNew")
    window.act_open = add_action(window, "&Open project…", window.open_project_dialog, QKeySequence("Ctrl+Shift+O"),
                                 name="actionOpenProject")
    window.act_open_model = add_action(window, "Open &model…", lambda: window.browse_model(False), QKeySequence.Open,
                                       "Choose a model folder and load it", "actionOpenModel")
    window.act_open_graph = add_action(window, "Open &graph JSON…", lambda: graph_import.open_graph_json_dialog(window),
                                       None, "Open a Neuronpedia / circuit-tracer attribution graph of the loaded "
                                       "model", "actionOpenGraphJson")
    window.recent_menu = QMenu("Open &recent", window)
    window.recent_menu.setObjectName("recentMenu")
    window.recent_menu.aboutToShow.connect(window._fill_recent_menu)
    window.act_save = add_action(window, "&Save", window.save, QKeySequence.Save, name="actionSave")
    window.act_save_as = add_action(window, "Save &as…", window.save_as, QKeySequence.SaveAs, name="actionSaveAs")
    window.act_export = add_action(window, "&Export figure…", window.export_figure_dialog, QKeySequence("Ctrl+E"),
                                   "Write the current result as PNG, SVG or PDF", "actionExportFigure")
    window.act_export_data = add_action(window, "Export &data…", window.export_data_dialog, None,
                                        "Write the current result as CSV or NPZ", "actionExportData")
    window.act_export_experiment = add_action(
        window, "Export e&xperiment…", window.export_experiment_dialog, None,
        "Write this session as an experiment file that 'interp-workbench run' executes", "actionExportExperiment")
    window.act_copy = add_action(window, "&Copy figure", window.copy_figure, QKeySequence("Ctrl+Shift+C"),
                                 "Copy the current result's figure to the clipboard", "actionCopyFigure")
    window.act_quit = add_action(window, "&Quit", window.close, QKeySequence.Quit, name="actionQuit")
    for act in (window.act_new, window.act_open):
        f.addAction(act)
    f.addMenu(window.recent_menu)
    for act in (window.act_open_model, window.act_open_graph, None, window.act_save, window.act_save_as, None,
                window.act_export, window.act_export_data, window.act_export_experiment, window.act_copy, None,
                window.act_quit):
        f.addSeparator() if act is None else f.addAction(act)


def _build_sae_menu(window, s: QMenu) -> None:
    window.act_attach_sae = add_action(window, "&Attach SAE…", lambda: window.attach_sae_dialog(), None,
                                       "Attach an SAE to the hook point selected in the Layers tree",
                                       "actionAttachSae")
    window.act_dashboards = add_action(window, "Build &dashboards…", window.build_dashboards_dialog, None,
                                       "Build feature dashboards of the attached SAE over a corpus",
                                       "actionBuildDashboards")
    window.act_train_sae = add_action(window, "&Train SAE…", lambda: window.train_sae_dialog(), None,
                                      "Train an SAE on a hook point's activations over a corpus", "actionTrainSae")
    window.act_sae_metrics = add_action(window, "SAE &metrics…", lambda: window.sae_ctl.build_metrics_dialog(), None,
                                        "L0, explained variance, CE recovered and KL of the attached SAE over a "
                                        "corpus", "actionSaeMetrics")
    window.act_train_transcoders = add_action(
        window, "Train t&ranscoders…", lambda: window.train_transcoders_dialog(), None,
        "Train per-layer transcoders (for attribution graphs) on a corpus", "actionTrainTranscoders")
    for act in (window.act_attach_sae, window.act_dashboards, window.act_train_sae, window.act_sae_metrics,
                window.act_train_transcoders):
        s.addAction(act)


def _build_view_menu(window, v: QMenu) -> None:
    """A toggle per dock, the shared colour scale and Reset layout."""
    for dock in window.docks.values():
        v.addAction(dock.toggleViewAction())
    v.addSeparator()
    window.act_shared_scale = add_action(window, "&Shared colour scale", window.set_shared_colour_scale, None,
                                         "One colour scale for all results of the same value (metric), so "
                                         "equal colours mean equal numbers", "actionSharedColourScale")
    window.act_shared_scale.setCheckable(True)
    v.addAction(window.act_shared_scale)
    v.addAction(add_action(window, "Reset &layout", window.reset_layout, name="actionResetLayout"))
