"""View type `token_strip`: the prompt as a strip of tokens coloured by attribution (diverging, centred on 0),
one strip per method computed on the same tokens (side by side for comparison), and the deletion curve."""
from __future__ import annotations

import html

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QLabel, QVBoxLayout, QWidget

from desktop_app.ui.colormaps import colormap


def _token(label) -> str:
    head, sep, rest = str(label).partition(": ")
    return rest if sep and head.isdigit() else str(label)


def strip_html(result) -> str:
    """One line of HTML: the method, then each token on its attribution's colour (scaled to this strip's max)."""
    values = np.asarray(result.values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    m = float(np.abs(finite).max()) if finite.size else 1.0
    rgb = colormap(values, -(m or 1.0), m or 1.0)
    labels = result.labels.get("position") or [str(i) for i in range(values.size)]
    method = str((result.params or {}).get("method", result.name)).replace("_", " ")
    cells = []
    for (r, g, b), label, v in zip(rgb, labels, values):
        text = html.escape(_token(label))
        cells.append(f'<span style="background-color:rgb({r},{g},{b}); color:black">&nbsp;{text}&nbsp;</span>')
    from desktop_app.project import kinds

    value = html.escape(kinds.value_label(result))
    scale = (f' <span style="color:#555">— colour: {value}, <span style="background-color:rgb(33,102,172); '
             f'color:white">&nbsp;−{m:.3g}&nbsp;</span> 0 <span style="background-color:rgb(178,24,43); '
             f'color:white">&nbsp;+{m:.3g}&nbsp;</span></span>')
    return (f"<b>{html.escape(result.name)}</b> ({html.escape(method)}){scale}<br>"
            f'<span style="font-size:13pt">' + "&#8202;".join(cells) + "</span>")


class TokenStripView(QWidget):
    view_type = "token_strip"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("tokenStripView")
        self.strips = QLabel("")
        self.strips.setObjectName("tokenStrips")
        self.strips.setTextFormat(Qt.RichText)
        self.strips.setWordWrap(True)
        self.strips.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.strips.setToolTip("Each token on the colour of its attribution: red positive, blue negative, "
                               "white 0 (scaled per method)")
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setBackground(None)
        self.curve_plot = self.graphics.addPlot()
        self.curve_plot.setLabel("bottom", "tokens removed (most attributed first)")
        self.curve_plot.setLabel("left", "target (logit, probability or logit diff)")
        self.curve_plot.addLegend(offset=(-10, 10))
        layout = QVBoxLayout(self)
        layout.setContentsMargins(2, 2, 2, 2)
        layout.addWidget(self.strips)
        layout.addWidget(self.note)
        layout.addWidget(self.graphics, 1)
        self.shown: list = []

    def show_result(self, result, others=()) -> None:
        """`others`: results of the same kind on the same tokens, shown under the current one."""
        self.shown = [result] + [o for o in others if o is not result]
        self.strips.setText("<br>".join(strip_html(r) for r in self.shown))
        self.strips.setToolTip("Each token on the colour of its attribution: red positive, blue negative, white 0 "
                               "(scaled per method). Values: " + "; ".join(
                                   f"{r.name}: " + ", ".join(f"{v:.3g}" for v in np.asarray(r.values).ravel())
                                   for r in self.shown))
        notes = [result.message] if result.message else []
        delta = result.extras.get("convergence_delta")
        if delta is not None:
            notes.append(f"completeness gap (sum of attributions minus the target's change): {float(delta[0]):.3g}")
        self.note.setText(" · ".join(notes))
        self.curve_plot.clear()
        target = str((result.params or {}).get("target", "") or "target").replace("_", " ")
        self.curve_plot.setLabel("left", target)
        for i, r in enumerate(self.shown):
            curve = r.extras.get("deletion_curve")
            if curve is not None:
                name = str((r.params or {}).get("method", r.name)).replace("_", " ")
                self.curve_plot.plot(np.arange(len(curve)), np.asarray(curve, dtype=np.float64), name=name,
                                     pen=pg.intColor(i, hues=max(len(self.shown), 3)), symbol="o", symbolSize=4)
