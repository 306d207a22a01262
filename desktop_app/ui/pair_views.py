"""The per-pair bar chart (`pairBarsView`) of a result over a dataset: for the clicked cell, each pair's clean,
corrupted and patched metric side by side (the patched value is the pair's own value at that cell, from
extras values_per_pair; clean / corrupted from extras clean_metric / corrupted_metric, in the same units)."""
from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

SERIES = (("clean", (70, 130, 180)), ("corrupted", (205, 92, 92)), ("patched", (90, 160, 90)))
_WIDTH = 0.27


class PairBarsView(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("pairBarsView")
        self.setToolTip("Each pair's clean, corrupted and patched metric at the clicked cell")
        self.title_label = QLabel("Click a cell of a result over a dataset to see it pair by pair.")
        self.title_label.setObjectName("pairBarsTitle")
        self.title_label.setWordWrap(True)
        self.values: dict[str, np.ndarray] = {}
        self.plot = None
        self._items = []
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(self.title_label)
        self._layout = lay

    def _ensure_plot(self):
        if self.plot is None:
            import pyqtgraph as pg

            self.plot = pg.PlotWidget()
            self.plot.setBackground(None)  # the system palette, as the heatmap pane
            self.plot.setMinimumHeight(160)
            self.plot.setMenuEnabled(False)
            self.plot.getAxis("left").enableAutoSIPrefix(False)
            self.plot.showGrid(y=True, alpha=0.3)
            self.plot.setLabel("bottom", "pair")
            self.legend = self.plot.addLegend(offset=(-10, 10))
            self._layout.addWidget(self.plot, 1)

    def show_cell(self, result, where: str, patched: np.ndarray) -> None:
        """Bars of every pair at one cell; `patched` [pair] is the cell's per-pair value as the heatmap shows it."""
        import pyqtgraph as pg

        self._ensure_plot()
        n = len(patched)
        self.values = {"patched": np.asarray(patched, dtype=np.float32)}
        for what in ("clean", "corrupted"):
            v = np.asarray(result.extras.get(f"{what}_metric", np.full(n, np.nan)), dtype=np.float32).reshape(-1)
            self.values[what] = v if v.size == n else np.full(n, np.nan, np.float32)
        for item in self._items:
            self.plot.removeItem(item)
        self.legend.clear()
        self._items = []
        x = np.arange(n, dtype=np.float64)
        for k, (what, colour) in enumerate(SERIES):
            heights = np.nan_to_num(self.values[what], nan=0.0)
            item = pg.BarGraphItem(x=x + (k - 1) * _WIDTH, height=heights, width=_WIDTH, brush=pg.mkBrush(*colour),
                                   name=what)
            self.plot.addItem(item)
            self._items.append(item)
        ticks = [(i, str(i)) for i in range(n)] if n <= 40 else [(i, str(i)) for i in range(0, n, max(1, n // 20))]
        self.plot.getAxis("bottom").setTicks([ticks])
        from desktop_app.project import kinds

        self.plot.setLabel("left", kinds.value_label(result))
        self.title_label.setText(f"<b>{result.name}</b> · {where} · {n} pairs: clean, corrupted and patched metric")
