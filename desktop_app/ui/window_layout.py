"""The main window's widgets and where they sit: the result pane in the middle, the docks around it and the
status bar. Builds them onto the window (MainWindow keeps them as attributes: tests and controllers use them)."""
from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDockWidget, QHBoxLayout, QLabel, QScrollArea, QSplitter, QVBoxLayout, QWidget

from desktop_app.ui.analysis_list import AnalysisListPanel
from desktop_app.ui.dataset_table import DatasetPanel
from desktop_app.ui.pair_views import PairBarsView
from desktop_app.ui.panels import AnalysisPanel, LayerTreePanel, MessageBar, ModelPanel, PromptsPanel
from desktop_app.ui.plots import ResultView
from desktop_app.ui.sae_panel import SAEFeatureView
from desktop_app.ui.training_view import TrainingView


def build_window_layout(window) -> None:
    """All panes of `window`, before any controller exists (the controllers are handed these widgets)."""
    build_result_pane(window)
    build_docks(window)
    build_status_bar(window)
    window.layer_panel.checked_changed.connect(window._hooks_checked)


def build_result_pane(window) -> None:
    """The central widget: message bar over the result view, with the clicked cell's predictions beside it."""
    window.message_bar = MessageBar()
    window.result_view = ResultView()
    window.result_view.setObjectName("heatmapView")
    window.result_view.model_of = window._model_name_of
    window.result_view.setToolTip("The current result; hover a cell for its value, click to select it")
    window.predictions_label = QLabel("Click a heatmap cell to see the top next tokens of the clean, corrupted "
                                      "and patched runs.")
    window.predictions_label.setObjectName("cellPredictionsLabel")
    window.predictions_label.setToolTip("Top-5 next tokens of the clean, corrupted and patched runs of the "
                                        "clicked cell")
    window.predictions_label.setWordWrap(True)
    window.predictions_label.setAlignment(Qt.AlignTop | Qt.AlignLeft)
    window.predictions_label.setTextInteractionFlags(Qt.TextSelectableByMouse)
    window.predictions_label.setMargin(6)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setWidget(window.predictions_label)
    scroll.setMinimumWidth(150)
    split = QSplitter(Qt.Horizontal)
    split.setObjectName("resultSplitter")
    split.addWidget(window.result_view)
    split.addWidget(scroll)
    split.setStretchFactor(0, 4)
    split.setStretchFactor(1, 1)
    split.setSizes([800, 200])
    central = QWidget()
    lay = QVBoxLayout(central)
    lay.setContentsMargins(2, 2, 2, 2)
    lay.addWidget(window.message_bar)
    lay.addWidget(split, 1)
    window.setCentralWidget(central)


def _prompts_box(prompts_panel: PromptsPanel, dataset_panel: DatasetPanel) -> QWidget:
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea()  # long prompts wrap their token chips: scroll rather than cut them
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QScrollArea.NoFrame)
    scroll.setWidget(prompts_panel)
    scroll.setMinimumHeight(175)  # both prompts and their first chip lines stay in view
    row.addWidget(scroll, 2)
    row.addWidget(dataset_panel, 3)
    return box


def build_docks(window) -> None:
    """The panels and `window.docks` (objectName -> QDockWidget); SAE, training and per-pair docks start hidden."""
    window.model_panel = ModelPanel()
    window.prompts_panel = PromptsPanel()
    window.dataset_panel = DatasetPanel()
    prompts_box = _prompts_box(window.prompts_panel, window.dataset_panel)
    window.layer_panel = LayerTreePanel()
    window.analysis_panel = AnalysisPanel()
    window.analysis_list = AnalysisListPanel()
    window.analysis_list.set_session(window.session)
    window.analysis_list.run_all.connect(window.run_all)
    window.analysis_list.rerun.connect(window.run_named)
    window.sae_view = SAEFeatureView()
    window.sae_view.setToolTip("SAE features of the attached hook point on the clean prompt")
    window.training_view = TrainingView()
    window.pair_bars = PairBarsView()
    window.docks = {}
    for name, title, widget, area in (
            ("modelDock", "Model", window.model_panel, Qt.LeftDockWidgetArea),
            ("layerDock", "Layers", window.layer_panel, Qt.LeftDockWidgetArea),
            ("promptsDock", "Prompts", prompts_box, Qt.TopDockWidgetArea),
            ("analysisDock", "Analysis", window.analysis_panel, Qt.RightDockWidgetArea),
            ("analysisListDock", "Analyses", window.analysis_list, Qt.LeftDockWidgetArea),
            ("saeDock", "SAE features", window.sae_view, Qt.RightDockWidgetArea),
            ("trainDock", "SAE training", window.training_view, Qt.BottomDockWidgetArea),
            ("pairBarsDock", "Per pair", window.pair_bars, Qt.BottomDockWidgetArea)):
        dock = QDockWidget(title, window)
        dock.setObjectName(name)
        dock.setWidget(widget)
        window.addDockWidget(area, dock)
        window.docks[name] = dock
    window.docks["saeDock"].hide()
    window.docks["trainDock"].hide()
    window.docks["pairBarsDock"].hide()
    window.tabifyDockWidget(window.docks["analysisDock"], window.docks["saeDock"])
    window.resizeDocks([window.docks["promptsDock"]], [205], Qt.Vertical)
    window.resizeDocks([window.docks["modelDock"], window.docks["analysisDock"]], [300, 300], Qt.Horizontal)


def build_status_bar(window) -> None:
    """Device, memory and job state as permanent widgets of the status bar."""
    sb = window.statusBar()
    sb.setObjectName("statusBar")
    window.device_label = QLabel("no model")
    window.device_label.setToolTip("Where the model runs")
    window.memory_label = QLabel("")
    window.memory_label.setToolTip("Memory used by the model's weights")
    window.job_label = QLabel("idle")
    window.job_label.setObjectName("jobStateLabel")
    window.job_label.setToolTip("What the worker thread is doing")
    for w in (window.device_label, window.memory_label, window.job_label):
        sb.addPermanentWidget(w)



def metric_field_assist(analysis_panel: AnalysisPanel, submit, prompts):
    """Completion and the parse error (a `metricErrorLabel` row under the field) of the metric expression field
    (ui.metric_field); None when the analysis panel has no metric field."""
    from desktop_app.ui.metric_field import MetricFieldAssist

    field = analysis_panel.fields.get(("metric", "choice"))
    if field is None:
        return None
    label = QLabel("")
    label.setObjectName("metricErrorLabel")
    label.setStyleSheet("color: #b00020")
    label.setWordWrap(True)
    form = analysis_panel._form
    row, _role = form.getWidgetPosition(field.widget)
    form.insertRow(row + 1, "", label)
    return MetricFieldAssist(field.widget, label, submit, prompts)
