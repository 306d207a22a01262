"""View type `attention_pattern`: a grid of thumbnails (one per layer and head, or per layer for rollout) to
click, and the chosen pattern large, query x key, with token labels on both axes."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QHBoxLayout, QLabel, QSplitter, QVBoxLayout, QWidget

from desktop_app.ui.colormaps import lut_for_limits

MAX_THUMBNAILS = 400


def _tick(label) -> str:
    head, sep, rest = str(label).partition(": ")
    return rest if sep and head.isdigit() else str(label)


class _Thumb(pg.ImageItem):
    def __init__(self, view, key):
        super().__init__(axisOrder="row-major")
        self._view, self.key = view, key

    def mouseClickEvent(self, event):
        self._view.select(*self.key)
        event.accept()


class AttentionPatternView(QWidget):
    view_type = "attention_pattern"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("attentionPatternView")
        self.result = None
        self.selected: tuple[int, int] = (0, 0)
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.hover = QLabel(" ")
        self.hover.setObjectName("attentionHoverLabel")
        self.thumbs = pg.GraphicsLayoutWidget()
        self.thumbs.setObjectName("attentionThumbnails")
        self.thumbs.setBackground(None)
        self.thumbs.setToolTip("Click a pattern to show it large (rows: layers, columns: heads)")
        self.big = pg.GraphicsLayoutWidget()
        self.big.setBackground(None)
        self.plot = self.big.addPlot()
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.getViewBox().invertY(True)
        self.plot.getViewBox().setMouseEnabled(x=False, y=False)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=pg.ColorMap(np.linspace(0.0, 1.0, 256),
                                                                                lut_for_limits(0.0, 1.0)),
                                        interactive=False, width=14, label="attention")
        self.colorbar.setImageItem(self.image, insert_in=self.plot)
        self.plot.setLabel("left", "query")
        self.plot.setLabel("bottom", "key")
        self.plot.scene().sigMouseMoved.connect(self._hovered)
        split = QSplitter(Qt.Horizontal)
        split.addWidget(self.thumbs)
        split.addWidget(self.big)
        split.setSizes([300, 600])
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(top)
        layout.addWidget(split, 1)
        layout.addWidget(self.hover)

    def _grid(self) -> np.ndarray:
        """The result as [layer, head, query, key] (rollout gets one 'head')."""
        values = np.asarray(self.result.values, dtype=np.float64)
        return values[:, None] if values.ndim == 3 else values

    def show_result(self, result, others=()) -> None:
        self.result = result
        grid = self._grid()
        n_layers, n_heads = grid.shape[:2]
        self.thumbs.clear()
        layers = result.labels.get("layer") or [str(i) for i in range(n_layers)]
        heads = result.labels.get("head") or ([str(i) for i in range(n_heads)] if result.values.ndim == 4 else [""])
        if n_layers * n_heads <= MAX_THUMBNAILS:
            for h in range(n_heads):  # column and row headers: which head, which layer
                if heads[h]:
                    self.thumbs.addLabel(f"head {heads[h]}", row=0, col=h + 1, size="8pt")
            for L in range(n_layers):
                self.thumbs.addLabel(f"layer {layers[L]}", row=L + 1, col=0, angle=-90, size="8pt")
                for h in range(n_heads):
                    vb = self.thumbs.addViewBox(row=L + 1, col=h + 1, lockAspect=True, enableMouse=False)
                    vb.invertY(True)
                    thumb = _Thumb(self, (L, h))
                    thumb.setImage(np.nan_to_num(grid[L, h]), autoLevels=False, levels=(0.0, 1.0))
                    thumb.setLookupTable(lut_for_limits(0.0, 1.0))
                    vb.addItem(thumb)
                    thumb.setToolTip(f"layer {layers[L]}" + (f", head {heads[h]}" if heads[h] else ""))
        self._layer_labels, self._head_labels = layers, heads
        keys = result.labels.get("key") or [str(i) for i in range(grid.shape[-1])]
        queries = result.labels.get("query") or [str(i) for i in range(grid.shape[-2])]
        self.plot.getAxis("bottom").setTicks([[(i + 0.5, _tick(k)[:10]) for i, k in enumerate(keys)]])
        self.plot.getAxis("left").setTicks([[(i + 0.5, _tick(q)[:10]) for i, q in enumerate(queries)]])
        self._keys, self._queries = keys, queries
        self.select(*(self.selected if self.selected[0] < n_layers and self.selected[1] < n_heads else (0, 0)))

    def select(self, layer: int, head: int) -> None:
        self.selected = (layer, head)
        grid = self._grid()
        pattern = np.nan_to_num(grid[layer, head])
        self.image.setImage(pattern, autoLevels=False, levels=(0.0, 1.0))
        self.image.setRect(0, 0, pattern.shape[1], pattern.shape[0])
        self.plot.setRange(xRange=(0, pattern.shape[1]), yRange=(0, pattern.shape[0]), padding=0)
        what = self.result.kind.replace("_", " ")
        head = f", head {self._head_labels[head]}" if self._head_labels[head] else ""
        self.title.setText(f"<b>{self.result.name}</b> — {what}: layer {self._layer_labels[layer]}{head}")

    def _hovered(self, scene_pos):
        if self.result is None or not self.plot.sceneBoundingRect().contains(scene_pos):
            return
        p = self.plot.getViewBox().mapSceneToView(scene_pos)
        q, k = int(np.floor(p.y())), int(np.floor(p.x()))
        grid = self._grid()
        if 0 <= q < grid.shape[-2] and 0 <= k < grid.shape[-1]:
            L, h = self.selected
            self.hover.setText(f"query {self._queries[q]} → key {self._keys[k]}: {grid[L, h, q, k]:.4g}")
