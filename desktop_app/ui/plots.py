"""The result pane: a pyqtgraph heatmap (2-D results) or bar/line plot (1-D results) of one AnalysisResult.

Heatmaps follow pyqtgraph's MatrixDisplayExample: a row-major ImageItem (row = first dim, first row at the
top, as imshow and the exported figures draw it), category labels as axis ticks, and a ColorBarItem with the
shared diverging map centred on 0. Streaming cells are written into the result's array as they arrive and
repainted at most ~30 times a second with `setImage(..., autoLevels=False)`. Which part of a result is shown
(a pair, a position, a head) is ui.result_selectors; a graph result's ranked nodes are ui.graph_ranking.

pyqtgraph (a third of the start-up time) is imported when the pane is first shown or given a result, after
the window is already on screen.
"""
from __future__ import annotations

import html

import numpy as np
from PySide6.QtCore import QPointF, Qt, QTimer, Signal
from PySide6.QtGui import QCursor, QPalette
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSizePolicy, QToolTip, QVBoxLayout, QWidget

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.ui.colormaps import diverging_lut, lut_for_limits
from desktop_app.ui.result_selectors import ResultSelectors

REPAINT_MS = 33
_MAX_LABEL = 14


def _short(label: str) -> str:
    text = str(label)
    return text if len(text) <= _MAX_LABEL else text[:_MAX_LABEL - 1] + "…"


def _fmt(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:.4g}"


class ResultView(ResultSelectors, QWidget):
    """Shows one result; the window keeps one of these named `heatmapView`."""

    cell_clicked = Signal(object, float)  # index tuple into the shown 2-D/1-D array, value
    node_clicked = Signal(object, int)  # a graph result's bar clicked: (result, node index); ui.graph_ranking

    def __init__(self, parent=None):
        super().__init__(parent)
        self.result: AnalysisResult | None = None
        self._shown = np.zeros((0, 0), np.float32)  # the 2-D (or 1-D) array on screen
        self._row_labels: list[str] = []
        self._col_labels: list[str] = []
        self._dims: list[str] = []
        self._dirty = False

        top = QHBoxLayout()
        self.title_label = QLabel("Run an analysis to see its result here.")
        self.title_label.setObjectName("resultTitle")
        self.title_label.setWordWrap(True)
        self.title_label.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)
        top.addWidget(self.title_label, 1)
        self._add_selectors(top)
        self.model_of = None  # result -> "model NAME" for the title (the window sets it), or None
        # A colour scale shared with other results of the same value: |v| up to this (None: the result's own);
        # the window sets it before set_result.
        self.shared_extent: float | None = None

        self.stale_label = QLabel("")
        self.stale_label.setObjectName("staleLabel")
        self.stale_label.setWordWrap(True)
        self.stale_label.setToolTip("This result does not match the loaded model or its current settings; "
                                    "its values are kept, and re-running it updates it")
        self.stale_label.setStyleSheet("QLabel { background: #fff3cd; color: #664d03; padding: 3px; "
                                       "border: 1px solid #ffda6a; border-radius: 3px; }")
        self.stale_label.hide()
        self._stale = ""

        self.hover_label = QLabel(" ")
        self.hover_label.setObjectName("hoverLabel")
        self.hover_label.setToolTip("The cell under the mouse; click a cell to keep its value here")
        self.hover_label.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.graphics = None
        self._placeholder = QLabel("")

        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addLayout(top)
        layout.addWidget(self.stale_label)
        layout.addWidget(self._placeholder, 1)
        layout.addWidget(self.hover_label)
        self._layout = layout

        self._timer = QTimer(self)
        self._timer.setInterval(REPAINT_MS)
        self._timer.timeout.connect(self._repaint_if_dirty)
        self._timer.start()

    def showEvent(self, event):
        super().showEvent(event)
        if self.graphics is None:
            QTimer.singleShot(0, self._ensure_graphics)

    def _ensure_graphics(self):
        if self.graphics is not None:
            return
        import pyqtgraph as pg

        text = self.palette().color(QPalette.WindowText)
        pg.setConfigOptions(antialias=False, foreground=text)  # axis text follows the light / dark palette
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setObjectName("heatmapGraphics")
        self.graphics.setBackground(None)  # the system palette: right in light and dark mode
        from desktop_app.ui.token_axis import TokenAxis  # pyqtgraph is imported after the window shows

        self.plot = self.graphics.addPlot(row=0, col=0, axisItems={"bottom": TokenAxis("bottom")})
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.getViewBox().invertY(True)
        self.plot.getViewBox().setMouseEnabled(x=False, y=False)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image_item)
        self._cmap = pg.ColorMap(np.linspace(0.0, 1.0, 256), diverging_lut(256))
        self.colorbar = pg.ColorBarItem(values=(-1, 1), colorMap=self._cmap, interactive=False, width=16,
                                        label="")
        self.colorbar.setImageItem(self.image_item, insert_in=self.plot)
        self.colorbar.axis.enableAutoSIPrefix(False)  # "400 (x0.001)" reads worse than 0.4
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8, brush=pg.mkBrush(178, 24, 43))
        self.line = pg.PlotDataItem([], [], symbol="o", symbolSize=5)
        self.plot.addItem(self.bars)
        self.plot.addItem(self.line)
        from desktop_app.ui.graph_ranking import RankedNodes

        self.ranking = RankedNodes(self.plot, lambda: self._refresh(full=True))  # graph results: ranked nodes
        self.plot.getViewBox().sigResized.connect(lambda *_: self.plot.getAxis("bottom").relayout())
        self.plot.scene().sigMouseMoved.connect(self._on_mouse_moved)
        self.plot.scene().sigMouseClicked.connect(self._on_mouse_clicked)

        self._layout.replaceWidget(self._placeholder, self.graphics)
        self._placeholder.deleteLater()
        self._set_mode(None)
        if self.result is not None:
            self._refresh(full=True)

    # ---- public API ----
    def set_result(self, result: AnalysisResult | None, stale: str = "") -> None:
        """Show `result`; `stale` (a reason) marks it as not matching the loaded model or its settings."""
        self._ensure_graphics()
        self._stale = stale if result is not None else ""
        self.stale_label.setText(f"⚠ Stale: {self._stale}. The values are kept; re-run it to update it."
                                 if self._stale else "")
        self.stale_label.setVisible(bool(self._stale))
        self.result = result
        self._setup_pair_combo()
        self._setup_position_combo()
        self._refresh(full=True)

    def is_stale(self) -> bool:
        """True when the shown result was computed with another model or other settings than the current ones."""
        return bool(self._stale)

    def stale_reason(self) -> str:
        return self._stale

    def update_cells(self, index: tuple, values) -> None:
        """Write streamed cells into the result's array; the repaint timer shows them."""
        if self.result is None:
            return
        self.result.values[index] = values
        self._dirty = True

    def flush(self) -> None:
        """Repaint now (the end of a job)."""
        self._refresh(full=False)

    def image_data(self) -> np.ndarray:
        """The array on screen: the heatmap's image, or the 1-D values of a bar/line plot."""
        return self._shown.copy()

    def levels(self) -> tuple[float, float]:
        self._ensure_graphics()
        return tuple(self.colorbar.levels())

    def _labels(self, dim: str, n: int) -> list[str]:
        given = self.result.labels.get(dim) if self.result else None
        return [str(x) for x in given] if given is not None and len(given) == n else [str(i) for i in range(n)]

    def _set_mode(self, mode: str | None):
        if getattr(self, "_mode", "unset") == mode:
            return  # toggling visibility re-lays out the view and re-renders the axes on every streamed chunk
        self._mode = mode
        heat = mode == "heatmap"
        self.image_item.setVisible(heat)
        self.colorbar.setVisible(heat)
        self.bars.setVisible(mode == "bars")
        self.line.setVisible(mode == "line")
        self.ranking.set_visible(mode == "ranked")

    def _refresh(self, full: bool):
        self._dirty = False
        r = self.result
        if r is None:
            self._shown = np.zeros((0, 0), np.float32)
            self._set_mode(None)
            self.title_label.setText("Run an analysis to see its result here.")
            return
        if self.ranking.applies(r):
            self._set_mode("ranked")
            self._shown, self._dims = self.ranking.paint(r), ["rank"]
            self.title_label.setText(self._title())
            return
        values, dims = self._shown_array()
        self._shown = values
        if full:
            self._dims = dims
            self.title_label.setText(self._title())
        if values.ndim == 2:
            self._paint_heatmap(values, dims, full)
        else:
            self._paint_series(values.reshape(-1), dims[:1] or ["value"], full)
        if not full:
            self.title_label.setText(self._title())

    def column_labels(self) -> list[tuple[int, str]]:
        """(column, text) of the column labels drawn now: every column unless even rotated text cannot fit."""
        return self.plot.getAxis("bottom").shown_labels()

    def _paint_heatmap(self, values, dims, full):
        self._set_mode("heatmap")
        lo, hi = self._limits(values)
        self.image_item.setImage(values, autoLevels=False, levels=(lo, hi))
        if (lo, hi) != tuple(self.colorbar.levels()):
            if lo < 0:
                self.colorbar.setColorMap(self._cmap)
            else:
                import pyqtgraph as pg
                self.colorbar.setColorMap(pg.ColorMap(np.linspace(0.0, 1.0, 256), lut_for_limits(lo, hi)))
            self.colorbar.setLevels((lo, hi))
        if not full:
            return
        self.plot.getViewBox().invertY(True)
        n_rows, n_cols = values.shape
        self._row_labels = self._labels(dims[0], n_rows)
        self._col_labels = self._labels(dims[1], n_cols)
        self.image_item.setRect(0, 0, n_cols, n_rows)
        left, bottom = self.plot.getAxis("left"), self.plot.getAxis("bottom")
        left.setTicks([[(i + 0.5, _short(t)) for i, t in enumerate(self._row_labels)]])
        bottom.set_labels(self._col_labels)
        left.setLabel(dims[0])
        bottom.setLabel(dims[1])
        self.colorbar.axis.setLabel(self._value_name())
        self.plot.setRange(xRange=(0, n_cols), yRange=(0, n_rows), padding=0)

    def _paint_series(self, values, dims, full):
        n = values.size
        xs = np.arange(n)
        finite = np.where(np.isfinite(values), values, 0.0)
        if n <= 64:
            self._set_mode("bars")
            self.bars.setOpts(x=xs, height=finite, width=0.8, brushes=self._bar_brushes(finite))
        else:
            self._set_mode("line")
            self.line.setData(xs, values, connect="finite")
        if full:
            self._row_labels = self._labels(dims[0], n)
            self._col_labels = []
            bottom, left = self.plot.getAxis("bottom"), self.plot.getAxis("left")
            bottom.set_labels(self._row_labels if n <= 64 else None, offset=0.0)
            bottom.setLabel(dims[0])
            left.setTicks(None)
            left.setLabel(self._value_name())
            self.plot.getViewBox().invertY(False)
        lo, hi = (float(np.nanmin(values)), float(np.nanmax(values))) if np.isfinite(values).any() else (0.0, 1.0)
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        pad = 0.05 * (hi - lo or 1.0)
        self.plot.setRange(xRange=(-0.6, n - 0.4), yRange=(lo - pad, hi + pad), padding=0)

    def _limits(self, values) -> tuple[float, float]:
        finite = values[np.isfinite(values)]
        m = float(np.abs(finite).max()) if finite.size else 0.0
        if self.shared_extent:
            m = max(m, float(self.shared_extent))
        m = m or 1.0
        if self.result is not None and kinds.scale_of(self.result) == "sequential" and (finite >= 0).all():
            return 0.0, m
        return -m, m  # symmetric: 0 is white

    def _value_name(self) -> str:
        r = self.result
        return kinds.value_label(r)

    def _bar_brushes(self, heights):
        """Red bars, and blue ones below zero when the kind's scale is diverging (as in the exported figure)."""
        import pyqtgraph as pg

        if not hasattr(self, "_brush_pos"):
            self._brush_pos, self._brush_neg = pg.mkBrush(178, 24, 43), pg.mkBrush(33, 102, 172)
        diverging = self.result is not None and kinds.scale_of(self.result) == "diverging"
        return [self._brush_neg if diverging and h < 0 else self._brush_pos for h in heights]

    def _title(self) -> str:
        r = self.result
        parts = [f"<b>{r.name}</b> — {r.kind.replace('_', ' ')}"]
        model = self.model_of(r) if self.model_of is not None else ""
        if model:
            parts.append(html.escape(model))
        for key in ("component", "direction", "positions"):
            if r.params.get(key):
                parts.append(f"{key} {r.params[key]}")
        metrics = (("clean", r.clean_metric), ("corrupted", r.corrupted_metric))
        pair = self.pair_index()
        if pair is not None:
            parts.append(f"pair {pair} of {self.per_pair().shape[0]}")
            metrics = tuple((n, float(np.asarray(r.extras[f"{n}_metric"]).reshape(-1)[pair]))
                            for n in ("clean", "corrupted") if np.size(r.extras.get(f"{n}_metric", ())) > pair)
        refs = [f"{n} {_fmt(v)}" for n, v in metrics if np.isfinite(v)]
        if refs:
            parts.append(f"{self._value_name()}: " + ", ".join(refs))
        raw = kinds.raw_logit_diffs(r)
        if raw and self._value_name() != "logit_diff":
            parts.append("raw logit diff: " + ", ".join(f"{n} {_fmt(v)}" for n, v in raw.items()))
        if r.status != "complete":  # a stopped training run has every value it got to: its message says the rest
            done = r.done_fraction()
            parts.append(f"<i>{r.status}: {done:.0%} of cells</i>" if done < 1 else f"<i>{r.status}</i>")
        if r.message:
            parts.append(r.message)
        return " · ".join(parts)

    def _repaint_if_dirty(self):
        if self._dirty and self.graphics is not None:
            self._refresh(full=False)

    # ---- mouse ----
    def _cell_at(self, scene_pos: QPointF):
        if self.result is None or not self.plot.sceneBoundingRect().contains(scene_pos):
            return None
        p = self.plot.getViewBox().mapSceneToView(scene_pos)
        if self._mode == "ranked":
            k = self.ranking.rank_at(p.y())  # anywhere on a bar's row
            return None if k is None else (k,)
        if self._shown.ndim == 2:
            row, col = int(np.floor(p.y())), int(np.floor(p.x()))
            if 0 <= row < self._shown.shape[0] and 0 <= col < self._shown.shape[1]:
                return (row, col)
        elif self._shown.ndim == 1:
            i = int(np.round(p.x()))
            if 0 <= i < self._shown.shape[0]:
                return (i,)
        return None

    def describe(self, cell) -> str:
        if self._mode == "ranked":
            return self.ranking.describe(cell[0])
        v = float(self._shown[cell])
        if len(cell) == 2:
            where = f"{self._dims[0]} {self._row_labels[cell[0]]}, {self._dims[1]} {self._col_labels[cell[1]]}"
        else:
            where = f"{self._dims[0] if self._dims else 'index'} {self._row_labels[cell[0]]}"
        pair = self.pair_index()
        if pair is not None:
            return f"{where}: {self._value_name()} of pair {pair} = {_fmt(v)}"
        sem = self.sem_at(cell)
        if sem is not None:
            return f"{where}: mean {self._value_name()} = {_fmt(v)} ± {_fmt(sem)} (standard error)"
        return f"{where}: {self._value_name()} = {_fmt(v)}"

    def _on_mouse_moved(self, scene_pos):
        cell = self._cell_at(scene_pos)
        if cell is not None:
            self.hover_label.setText(self.describe(cell))
        if self._mode == "ranked":  # the node's id and feature card beside the mouse
            QToolTip.showText(QCursor.pos(), self.ranking.tooltip(cell[0]) if cell is not None else "", self.graphics)

    def _on_mouse_clicked(self, event):
        cell = self._cell_at(event.scenePos())
        if cell is not None:
            self.hover_label.setText("Selected: " + self.describe(cell))
            self.cell_clicked.emit(cell, float(self._shown[cell]))
            if self._mode == "ranked":
                self.node_clicked.emit(self.result, self.ranking.node_of(cell[0]))
