"""Views keyed by a kind's view type (project.kinds VIEW_TYPES) beyond the generic heatmap / bars pane: shown
in the "Detail" dock beside the result pane when a result of such a kind is shown. A new view type is one
module with a QWidget class (`show_result(result, others)`, and `attach(window)` when it needs the window's runner,
session or result pane) and one entry in `_VIEW_MODULES`."""
from __future__ import annotations

import importlib

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QDockWidget, QStackedWidget

# view type -> (module, class); imported when first needed (pyqtgraph stays off the start-up path)
_VIEW_MODULES = {
    "lens_grid": ("desktop_app.ui.lens_view", "LensGridView"),
    "attention_pattern": ("desktop_app.ui.attention_view", "AttentionPatternView"),
    "token_strip": ("desktop_app.ui.token_strip_view", "TokenStripView"),
    "graph": ("desktop_app.ui.graph_view", "GraphView"),
}
DOCK_NAME = "detailDock"


def has_view(view_type: str) -> bool:
    return view_type in _VIEW_MODULES


def _comparable(window, result) -> list:
    """Other results of the project of the same kind on the same tokens (shown side by side)."""
    out = []
    for entry in getattr(window.project, "analyses", []):
        other = entry.result
        if other is None or other is result or other.kind != result.kind:
            continue
        if np.array_equal(np.asarray(other.tokens_clean), np.asarray(result.tokens_clean)) and \
                other.values.shape == result.values.shape:
            out.append(other)
    return out


def computed_with_loaded(window, result) -> bool:
    """Whether `result` is a result of the project computed with the loaded model (else nothing may run on it)."""
    for entry in window.project.analyses:
        if entry.result is result:
            return window.session.computed_with_loaded(entry.name)
    return False


def show_detail(window, result, record) -> None:
    """Show `result` in the detail dock if its kind's view type has a view here; else leave the dock alone."""
    if result is None or record is None or not has_view(record.view) or not np.asarray(result.values).size:
        return
    dock = window.docks.get(DOCK_NAME)
    if dock is None:
        dock = QDockWidget("Detail", window)
        dock.setObjectName(DOCK_NAME)
        dock.setWidget(QStackedWidget())
        window.addDockWidget(Qt.BottomDockWidgetArea, dock)
        window.docks[DOCK_NAME] = dock
        window.detail_views = {}
    views = window.detail_views
    view = views.get(record.view)
    if view is None:
        module, cls = _VIEW_MODULES[record.view]
        view = getattr(importlib.import_module(module), cls)()
        views[record.view] = view
        if hasattr(view, "attach"):  # a view that runs jobs or edits the project wires itself to the window once
            view.attach(window)
        dock.widget().addWidget(view)
    dock.widget().setCurrentWidget(view)
    view.show_result(result, _comparable(window, result))
    dock.show()
    dock.raise_()
    wanted = min(getattr(view, "PREFERRED_HEIGHT", 0), int(window.height() * 0.6))
    if dock.height() < wanted:  # a graph needs room: grow the dock once, the user's own size is kept after that
        window.resizeDocks([dock], [wanted], Qt.Vertical)
