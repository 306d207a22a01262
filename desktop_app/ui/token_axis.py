"""The heatmap's column axis: every token labelled ("9: ·John"), horizontal when the labels fit side by side,
rotated to read bottom-up when they do not, and only when even a rotated line is wider than a column every
k-th label (the index prefix still says which column each one is)."""
from __future__ import annotations

import math

import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QFont, QFontMetricsF

MAX_CHARS = 24
MAX_ROTATED_PX = 150


def _short(text: str) -> str:
    text = str(text)
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS - 1] + "…"


class TokenAxis(pg.AxisItem):
    def __init__(self, orientation="bottom", **kwargs):
        super().__init__(orientation, **kwargs)
        self._labels: list[str] = []
        self._offset = 0.5
        self.rotated = False
        self.step = 1

    def _metrics(self) -> QFontMetricsF:
        return QFontMetricsF(self.style.get("tickFont") or QFont())

    def set_labels(self, labels, offset: float = 0.5) -> None:
        """One label per column, centred at column + offset (0.5: heatmap cells; 0: bars); None: numbers."""
        if labels is None:
            self._labels = []
            self.setTicks(None)
            self.setHeight(None)  # pyqtgraph sizes a numeric axis itself, with room for its name
            return
        self._labels, self._offset = [_short(t) for t in labels], offset
        self.setTicks([[(j + offset, "") for j in range(len(self._labels))]])  # tick marks; the text is ours
        self.relayout()

    def shown_labels(self) -> list[tuple[int, str]]:
        """(column, text) of the labels drawn now."""
        return [(j, t) for j, t in enumerate(self._labels) if j % self.step == 0]

    def _column_px(self) -> float:
        n = max(len(self._labels), 1)
        view = self.linkedView()
        width = view.width() if view is not None else self.width()
        return max(width, 1.0) / n

    def relayout(self) -> None:
        fm = self._metrics()
        col = self._column_px()
        widest = max((fm.horizontalAdvance(t) for t in self._labels), default=0.0)
        line = fm.height()
        self.rotated = bool(self._labels) and widest + 6 > col
        self.step = max(1, math.ceil((line + 1) / col)) if self.rotated else 1
        text_px = min(widest, MAX_ROTATED_PX) if self.rotated else line
        height = int(text_px + 14 + (self.label.boundingRect().height() if self.label.isVisible() else 0))
        if abs(self.height() - height) > 1:
            self.setHeight(height)
        self.picture = None
        self.update()

    def resizeEvent(self, ev=None):
        super().resizeEvent(ev)
        if getattr(self, "_labels", None):  # resized once inside AxisItem.__init__, before our fields exist
            col = self._column_px()
            if getattr(self, "_last_col", None) != col:
                self._last_col = col
                self.relayout()

    def drawPicture(self, p, axisSpec, tickSpecs, textSpecs):
        view = self.linkedView()
        if view is None or not self._labels:
            super().drawPicture(p, axisSpec, tickSpecs, textSpecs)
            return
        super().drawPicture(p, axisSpec, tickSpecs, [])
        fm = self._metrics()
        p.setFont(self.style.get("tickFont") or QFont())
        p.setPen(self.textPen())
        top = 6.0
        for j, text in self.shown_labels():
            x = self.mapFromScene(view.mapViewToScene(QPointF(j + self._offset, 0))).x()
            if self.rotated:
                w = min(fm.horizontalAdvance(text), MAX_ROTATED_PX)
                shown = fm.elidedText(text, Qt.ElideRight, MAX_ROTATED_PX)
                p.save()
                p.translate(x, top)
                p.rotate(-90)
                p.drawText(QRectF(-w - 2, -fm.height() / 2, w + 2, fm.height()), Qt.AlignRight | Qt.AlignVCenter,
                           shown)
                p.restore()
            else:
                w = fm.horizontalAdvance(text)
                p.drawText(QRectF(x - w / 2 - 2, top, w + 4, fm.height()), Qt.AlignCenter, text)
