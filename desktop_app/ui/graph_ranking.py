"""The result pane's chart of an attribution graph: the most influential nodes as horizontal bars, ranked.

A graph's values are one influence per node; drawn over the node index they say nothing. Here the top N nodes by
|influence on the logits| (features, error nodes, embeddings; the logit nodes are the targets, so they are listed in
the plot's title instead of ranked) are bars, rank 0 at the top, labelled "L1 #164 @ 13 ·to" (feature 164 of
layer 1 at position 13, token ·to), "error L2 @ 13 ·to", "emb @ 1 ·Mary", coloured by node kind as in the graph
view. ResultView (ui.plots) draws with this object for every result whose kind's view type is `graph`; hovering a
bar gives the node's id and its feature card, a click asks the graph view to show and ring that node."""
from __future__ import annotations

from html import escape

import numpy as np
import pyqtgraph as pg
from PySide6.QtGui import QFont, QFontMetricsF

from desktop_app.project import kinds as kind_registry
from desktop_app.project.feature_cards import CARDS_KEY, cards_of
from desktop_app.project.graph_ranking import AXIS_NAME, TOP_N, node_label, ranked_nodes
from desktop_app.ui.graph_card import card_html
from desktop_app.ui.graph_view import KIND_COLOURS

MIN_ROWS = 5


def applies(result) -> bool:
    """Whether the result pane shows `result` as ranked nodes (a graph kind carrying its node arrays)."""
    record = kind_registry.find(result.kind) if result is not None else None
    return record is not None and record.view == "graph" and "node_influence" in result.extras \
        and "node_kind" in result.extras


class RankedNodes:
    """Draws the ranking into a ResultView's plot item; hidden while the view shows another kind."""

    def __init__(self, plot, repaint):
        self.plot = plot
        self.repaint = repaint  # the pane's full refresh: the number of rows that fit changes with its height
        plot.getViewBox().sigResized.connect(self._resized)
        self.bars = pg.BarGraphItem(x0=[], y=[], width=[], height=0.8)
        self.bars.setVisible(False)
        plot.addItem(self.bars)
        self.result = None
        self.nodes = np.zeros(0, dtype=int)
        self.labels: list[str] = []
        self._cards_key = None
        self._cards: dict = {}

    applies = staticmethod(applies)

    def set_visible(self, on: bool) -> None:
        self.bars.setVisible(on)
        if not on:
            self.plot.setTitle(None)
            self.plot.getAxis("left").setWidth(None)  # back to the axis's own width
            self.plot.getAxis("bottom").setSIPrefixEnableRanges(None)  # pyqtgraph's default again
            self.plot.getAxis("bottom").updateAutoSIPrefix()

    def _font_height(self) -> float:
        axis = self.plot.getAxis("left")
        return QFontMetricsF(axis.style.get("tickFont") or QFont()).height()

    def fitting_rows(self) -> int:
        """How many bars get a readable label of their own in the plot's height now (TOP_N at most)."""
        height = self.plot.getViewBox().height()
        if height <= 0:  # not laid out yet
            return TOP_N
        return int(max(MIN_ROWS, min(TOP_N, height // (self._font_height() + 2))))

    def _resized(self, *_args) -> None:
        if self.bars.isVisible() and self.result is not None and self.fitting_rows() != len(self.nodes):
            self.repaint()

    def paint(self, result) -> np.ndarray:
        """Draw the top nodes of `result`; returns their influence in rank order (what the pane shows)."""
        ex = result.extras
        self.result = result
        self.nodes = ranked_nodes(ex, self.fitting_rows())
        values = np.asarray(ex["node_influence"], dtype=np.float64)[self.nodes]
        kinds = np.asarray(ex["node_kind"]).astype(str)
        self.labels = [node_label(ex, int(i)) for i in self.nodes]
        n = len(self.nodes)
        brushes = [pg.mkBrush(*KIND_COLOURS.get(kinds[i], (0, 0, 0))) for i in self.nodes]
        self.bars.setOpts(x0=np.zeros(n), y=np.arange(n, dtype=float), width=values, height=0.8, brushes=brushes,
                          pens=[pg.mkPen(None)] * n)
        left, bottom = self.plot.getAxis("left"), self.plot.getAxis("bottom")
        left.setTicks([[(k, t) for k, t in enumerate(self.labels)]])
        left.setLabel("")
        font = left.style.get("tickFont") or QFont()
        widest = max((QFontMetricsF(font).horizontalAdvance(t) for t in self.labels), default=0.0)
        left.setWidth(int(widest) + 16)  # every label whole: pyqtgraph's own width cuts long tick texts
        bottom.set_labels(None)
        bottom.setLabel(AXIS_NAME)
        self.plot.getViewBox().invertY(True)  # rank 0 at the top
        self.plot.setTitle(self._logits_line(ex, kinds, n) or None, size="9pt")
        finite = values[np.isfinite(values)]
        lo, hi = min(float(finite.min(initial=0.0)), 0.0), max(float(finite.max(initial=0.0)), 0.0)
        pad = 0.05 * (hi - lo or 1.0)
        self.plot.setRange(xRange=(lo - pad, hi + pad), yRange=(-0.6, max(n, 1) - 0.4), padding=0)
        bottom.setSIPrefixEnableRanges(((0.0, 0.0),))  # the influence as it is: "0.6", not "600 (x0.001)"
        bottom.updateAutoSIPrefix()
        return values.astype(np.float32)

    @staticmethod
    def _logits_line(ex: dict, kinds: np.ndarray, ranked: int) -> str:
        logits = np.where(kinds == "logit")[0]
        if not len(logits):
            return ""
        act = np.asarray(ex.get("node_activation", np.full(len(kinds), np.nan)), dtype=float)
        parts = [f"{escape(node_label(ex, int(i))[len('logit '):])} (p {act[i]:.3g})" for i in logits]
        return f"top {ranked} of {len(kinds) - len(logits)} nodes by |influence|; target logits: " + ", ".join(parts)

    # ---- the mouse -----------------------------------------------------------------------------------------------
    def rank_at(self, y: float) -> int | None:
        k = int(np.round(y))
        return k if 0 <= k < len(self.nodes) else None

    def node_of(self, rank: int) -> int:
        return int(self.nodes[rank])

    def describe(self, rank: int) -> str:
        i = self.node_of(rank)
        value = float(np.asarray(self.result.extras["node_influence"], dtype=float)[i])
        return f"#{rank + 1} {self.labels[rank]} (node {self.result.extras['node_ids'][i]}): {AXIS_NAME} {value:.4g}"

    def tooltip(self, rank: int) -> str:
        """The node's id, kind and influence, and its feature card when the graph has cards."""
        ex = self.result.extras
        i = self.node_of(rank)
        kind = str(np.asarray(ex["node_kind"])[i])
        lines = [f"<b>{escape(str(ex['node_ids'][i]))}</b> — {kind}", escape(self.labels[rank]),
                 f"{AXIS_NAME} {float(ex['node_influence'][i]):.4g}"]
        if kind == "feature":
            card = self._card(int(ex["node_layer"][i]), int(ex["node_feature"][i]))
            if card is not None:
                lines.append(card_html(card))
        return "<br>".join(lines)

    def _card(self, layer: int, feature: int):
        raw = self.result.extras.get(CARDS_KEY)
        if self._cards_key is None or self._cards_key[0] is not self.result or self._cards_key[1] is not raw:
            self._cards_key, self._cards = (self.result, raw), cards_of(self.result)  # cards come after the graph
        return self._cards.get((layer, feature))
