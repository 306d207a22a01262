"""View type `lens_grid`: a [layer, position] grid of the target's probability with each cell's top token
written in it, the top-k of the hovered cell, and a line of the target's rank over layers at one position."""
from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QVBoxLayout, QWidget

from desktop_app.ui.colormaps import lut_for_limits

MAX_TEXT_CELLS = 600  # above this many cells the grid is drawn without the tokens in it
MAX_CELL_TEXT = 7


def _tick(label) -> str:
    head, sep, rest = str(label).partition(": ")
    return rest if sep and head.isdigit() else str(label)


class LensGridView(QWidget):
    view_type = "lens_grid"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("lensGridView")
        self.result = None
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.position_combo = QComboBox()
        self.position_combo.setObjectName("lensPositionCombo")
        self.position_combo.setToolTip("The position whose target rank over layers the line below shows")
        self.position_combo.currentIndexChanged.connect(self._draw_rank)
        self.hover = QLabel(" ")
        self.hover.setObjectName("lensHoverLabel")
        self.hover.setWordWrap(True)
        self.hover.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground(None)
        self.grid = self.graphics.addPlot(row=0, col=0)
        self.grid.setMenuEnabled(False)
        self.grid.hideButtons()
        self.grid.getViewBox().setMouseEnabled(x=False, y=False)
        self.grid.getViewBox().invertY(True)  # layer 0 at the top, as in the result pane and the figures
        self.image = pg.ImageItem(axisOrder="row-major")
        self.grid.addItem(self.image)
        self.colorbar = pg.ColorBarItem(values=(0.0, 1.0), colorMap=pg.ColorMap(np.linspace(0.0, 1.0, 256),
                                                                                lut_for_limits(0.0, 1.0)),
                                        interactive=False, width=14, label="target probability")
        self.colorbar.setImageItem(self.image, insert_in=self.grid)
        self.rank_plot = self.graphics.addPlot(row=1, col=0)
        self.rank_plot.setMenuEnabled(False)
        self.rank_plot.hideButtons()
        self.rank_plot.setLabel("bottom", "layer")
        self.rank_plot.setLabel("left", "target rank")
        self.rank_plot.getAxis("left").setToolTip("Rank of the target token at each layer (1 = top), log scale")
        self.rank_plot.setLogMode(y=True)
        self.rank_line = self.rank_plot.plot([], [], symbol="o", symbolSize=5)
        self.graphics.ci.layout.setRowStretchFactor(0, 3)
        self.texts: list = []
        self.grid.scene().sigMouseMoved.connect(self._hovered)
        top = QHBoxLayout()
        top.addWidget(self.title, 1)
        top.addWidget(self.position_combo)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addLayout(top)
        layout.addWidget(self.graphics, 1)
        layout.addWidget(self.hover)

    def show_result(self, result, others=()) -> None:
        self.result = result
        values = np.asarray(result.values, dtype=np.float64)
        n_layers, n_pos = values.shape
        params = result.params or {}
        self.title.setText(f"<b>{result.name}</b> — {params.get('lens', 'logit')} lens, target "
                           f"{params.get('target', 'answer')}: probability at each layer's resid_post")
        self.image.setImage(np.nan_to_num(values, nan=0.0), autoLevels=False, levels=(0.0, 1.0))
        self.image.setLookupTable(lut_for_limits(0.0, 1.0))
        self.image.setRect(0, 0, n_pos, n_layers)
        positions = result.labels.get("position") or [str(i) for i in range(n_pos)]
        layers = result.labels.get("layer") or [str(i) for i in range(n_layers)]
        self.grid.getAxis("bottom").setTicks([[(i + 0.5, _tick(p)[:10]) for i, p in enumerate(positions)]])
        self.grid.getAxis("left").setTicks([[(i + 0.5, str(L)) for i, L in enumerate(layers)]])
        self.grid.setLabel("left", "layer")
        self.grid.setLabel("bottom", "position")
        self.grid.setRange(xRange=(0, n_pos), yRange=(0, n_layers), padding=0)
        for item in self.texts:
            self.grid.removeItem(item)
        self.texts = []
        words = result.extras.get("top_token_text")
        if words is not None and values.size <= MAX_TEXT_CELLS:
            for L in range(n_layers):
                for p in range(n_pos):
                    word = str(words[L, p, 0])[:MAX_CELL_TEXT]
                    colour = "w" if np.nan_to_num(values[L, p]) > 0.6 else "k"
                    item = pg.TextItem(word, color=colour, anchor=(0.5, 0.5))
                    item.setPos(p + 0.5, L + 0.5)
                    self.grid.addItem(item)
                    self.texts.append(item)
        self.position_combo.blockSignals(True)
        self.position_combo.clear()
        self.position_combo.addItems([f"position {p}" for p in positions])
        self.position_combo.setCurrentIndex(n_pos - 1)
        self.position_combo.blockSignals(False)
        self._draw_rank()

    def cell_text(self, layer: int, pos: int) -> str:
        r = self.result
        value = float(r.values[layer, pos])
        parts = [f"layer {layer}, position {r.labels.get('position', [pos] * (pos + 1))[pos]}: "
                 f"target probability {value:.4g}"]
        ranks = r.extras.get("target_rank")
        if ranks is not None:
            parts[0] += f", rank {int(ranks[layer, pos])}"
        words, probs = r.extras.get("top_token_text"), r.extras.get("top_token_probs")
        if words is not None and probs is not None:
            parts.append("top: " + ", ".join(f"{w} {float(p):.3f}" for w, p in zip(words[layer, pos], probs[layer, pos])))
        return " — ".join(parts)

    def _hovered(self, scene_pos):
        if self.result is None or not self.grid.sceneBoundingRect().contains(scene_pos):
            return
        p = self.grid.getViewBox().mapSceneToView(scene_pos)
        layer, pos = int(np.floor(p.y())), int(np.floor(p.x()))
        if 0 <= layer < self.result.values.shape[0] and 0 <= pos < self.result.values.shape[1]:
            self.hover.setText(self.cell_text(layer, pos))

    def _draw_rank(self, *_):
        r = self.result
        ranks = r.extras.get("target_rank") if r is not None else None
        pos = self.position_combo.currentIndex()
        if ranks is None or pos < 0:
            self.rank_line.setData([], [])
            return
        ranks_1 = ranks[:, pos].astype(np.float64) + 1.0  # 1 = the top token
        n_layers = ranks.shape[0]
        self.rank_line.setData(np.arange(n_layers), ranks_1)
        layers = r.labels.get("layer") or [str(i) for i in range(n_layers)]
        self.rank_plot.getAxis("bottom").setTicks([[(i, str(L)) for i, L in enumerate(layers)]])
        # log axis in decades: ticks 1, 10, 100 ... up to the worst rank, never crowded when the rank is flat
        decades = max(1, int(np.ceil(np.log10(max(float(np.nanmax(ranks_1)), 1.0) + 1e-9))))
        self.rank_plot.getAxis("left").setTicks([[(d, f"{10 ** d:g}") for d in range(decades + 1)], []])
        self.rank_plot.setYRange(-0.1, decades + 0.1, padding=0)
        self.rank_plot.setXRange(-0.3, n_layers - 0.7, padding=0)
