"""The result pane: a pyqtgraph heatmap (2-D results) or bar/line plot (1-D results) of one AnalysisResult.

Heatmaps follow pyqtgraph's MatrixDisplayExample: a row-major ImageItem (row = first dim, first row at the
top, as imshow and the exported figures draw it), category labels as axis ticks, and a ColorBarItem with the
shared diverging map centred on 0. Streaming cells are written into the result's array as they arrive and
repainted at most ~30 times a second with `setImage(..., autoLevels=False)`.

pyqtgraph (a third of the start-up time) is imported when the pane is first shown or given a result, after
the window is already on screen.
"""
from __future__ import annotations

import html

import numpy as np
from PySide6.QtCore import QPointF, Qt, QTimer, Signal
from PySide6.QtGui import QCursor, QPalette
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSizePolicy, QToolTip, QVBoxLayout, QWidget

from desktop_app.engine.errors import WorkbenchError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.ui.colormaps import diverging_lut, lut_for_limits

REPAINT_MS = 33
_MAX_LABEL = 14


def _short(label: str) -> str:
    text = str(label)
    return text if len(text) <= _MAX_LABEL else text[:_MAX_LABEL - 1] + "…"


def _fmt(v: float) -> str:
    return "—" if not np.isfinite(v) else f"{v:.4g}"


class ResultView(QWidget):
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
        self.position_combo = QComboBox()
        self.position_combo.setObjectName("headPositionCombo")
        self.position_combo.setToolTip("Head results per position: show the sum over positions or one position")
        self.position_combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
        self.position_combo.hide()
        self.pair_combo = QComboBox()  # a result over a dataset: the mean over pairs, or one pair's own values
        self.pair_combo.setObjectName("pairCombo")
        self.pair_combo.setToolTip("A result over a dataset of pairs: show the mean over pairs or one pair")
        self.pair_combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
        self.pair_combo.hide()
        top.addWidget(self.title_label, 1)
        top.addWidget(self.pair_combo)
        top.addWidget(self.position_combo)
        self._top = top
        self._slice_combos: dict[str, QComboBox] = {}  # leading dims of a result with more than two dims
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

    # ---- pairs of a dataset result ----
    def per_pair(self) -> np.ndarray | None:
        """extras values_per_pair [pair, ...dims] of the result when it matches its values, else None."""
        r = self.result
        v = r.extras.get("values_per_pair") if r is not None else None
        if v is None or np.ndim(v) != r.values.ndim + 1 or tuple(np.shape(v)[1:]) != tuple(r.values.shape):
            return None
        return np.asarray(v)

    def pair_index(self) -> int | None:
        """The pair shown, or None for the mean over pairs."""
        i = self.pair_combo.currentIndex()
        return i - 1 if i > 0 and self.per_pair() is not None else None

    def _setup_pair_combo(self):
        per_pair = self.per_pair()
        keep = self.pair_combo.currentIndex()
        self.pair_combo.blockSignals(True)
        self.pair_combo.clear()
        if per_pair is not None:
            self.pair_combo.addItem("mean")
            self.pair_combo.addItems([f"pair {i}" for i in range(per_pair.shape[0])])
            self.pair_combo.setCurrentIndex(keep if 0 <= keep < self.pair_combo.count() else 0)
        self.pair_combo.setVisible(per_pair is not None)
        self.pair_combo.blockSignals(False)

    def _source_values(self) -> np.ndarray:
        pair = self.pair_index()
        return self.per_pair()[pair] if pair is not None else self.result.values

    def sem_at(self, cell) -> float | None:
        """The standard error of the mean at a shown cell (None when not a mean over pairs, or the shown value
        is a sum over positions, whose error is not the sum of the errors)."""
        r = self.result
        sem = r.extras.get("sem") if r is not None else None
        if sem is None or self.pair_index() is not None or np.shape(sem) != r.values.shape:
            return None
        shown, _dims, summed = self._slice(np.asarray(sem, dtype=np.float32))
        return None if summed else float(shown[cell])

    # ---- drawing ----
    def _setup_position_combo(self):
        r = self.result
        self.position_combo.blockSignals(True)
        self.position_combo.clear()
        show = r is not None and r.values.ndim == 3 and "position" in r.dims
        if show:
            self.position_combo.addItem("sum over positions")
            labels = r.labels.get("position") or [str(i) for i in range(r.values.shape[r.dims.index("position")])]
            self.position_combo.addItems([f"position {lab}" for lab in labels])
        self.position_combo.setVisible(show)
        self.position_combo.blockSignals(False)
        self._setup_slice_combos()

    def _sliced_dims(self) -> list[str]:
        """Dims shown one index at a time: all but the last two of a result with more than two dims and no
        position dim to sum over ([layer, head, query, key] shows one layer's one head as query x key)."""
        r = self.result
        if r is None or r.values.ndim <= 2 or (r.values.ndim == 3 and "position" in r.dims):
            return []
        return list(r.dims[:-2])

    def _setup_slice_combos(self):
        for combo in self._slice_combos.values():
            self._top.removeWidget(combo)
            combo.deleteLater()
        self._slice_combos = {}
        r = self.result
        for dim in self._sliced_dims():
            n = r.values.shape[r.dims.index(dim)]
            labels = r.labels.get(dim) or list(range(n))
            combo = QComboBox()
            combo.setObjectName(f"{dim}SliceCombo")
            combo.setToolTip(f"Which {dim} to show")
            combo.addItems([f"{dim} {lab}" for lab in labels][:n])
            combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
            self._top.insertWidget(self._top.count() - 1, combo)
            self._slice_combos[dim] = combo
        self._start_at_kind_default()

    def _start_at_kind_default(self):
        """The selectors start where the kind's figure does (attention rollout: the last layer)."""
        if not self._slice_combos:
            return
        try:
            sliced = kinds.figure_slice(self.result, None)
        except WorkbenchError:  # e.g. a dim of length 0: the selectors stay at index 0
            sliced = None
        for dim, index in (sliced.chosen.items() if sliced is not None else ()):
            combo = self._slice_combos.get(dim)
            if combo is not None and 0 <= index < combo.count():
                combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(False)

    def figure_selection(self) -> dict[str, int]:
        """{dim: index} of the slice on screen, for a figure of the same slice (kinds with a figure_slice hook;
        others are drawn by the figure's own rule, so nothing is chosen for them)."""
        r = self.result
        record = kinds.find(r.kind) if r is not None else None
        if record is None or record.figure_slice is None:
            return {}
        return {dim: max(combo.currentIndex(), 0) for dim, combo in self._slice_combos.items()}

    def _shown_array(self):
        """(array 1-D or 2-D, its dims) for the result and the pair and position selectors."""
        values, dims, _summed = self._slice(np.asarray(self._source_values(), dtype=np.float32))
        return values, dims

    def shown_of(self, array) -> np.ndarray:
        """`array` (shaped like the result's values, e.g. one pair's) sliced and summed as the view shows it."""
        return self._slice(np.asarray(array, dtype=np.float32))[0]

    def _slice(self, values):
        summed = False
        dims = list(self.result.dims)
        for dim, combo in self._slice_combos.items():
            axis = dims.index(dim)
            values = np.take(values, max(combo.currentIndex(), 0), axis=axis)
            dims.pop(axis)
        while values.ndim > 2:
            axis = dims.index("position") if "position" in dims[1:] else values.ndim - 1
            choice = self.position_combo.currentIndex() if dims[axis] == "position" else 0
            if choice > 0:
                values = np.take(values, choice - 1, axis=axis)
            else:
                values = values.sum(axis=axis)  # NaN propagates: a partial sum is not shown as a sum
                summed = True
            dims.pop(axis)
        return values, dims, summed

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

    def cell_coordinates(self, cell) -> dict:
        """{dim: index} of a shown cell in the result's own dims; a dim summed over for display is left out."""
        r = self.result
        coords = dict(zip(self._dims, (int(i) for i in cell)))
        if r is not None and r.values.ndim > 2 and "position" in r.dims and self.position_combo.currentIndex() > 0:
            coords["position"] = self.position_combo.currentIndex() - 1
        for dim, combo in self._slice_combos.items():
            coords[dim] = max(combo.currentIndex(), 0)
        return coords

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
