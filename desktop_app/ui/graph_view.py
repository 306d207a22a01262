"""View type `graph`: an attribution graph laid out layer x token (x: the prompt's positions, y: embeddings at the
bottom, one row per layer, the logits on top). Nodes are coloured by kind and sized by influence; edges go from
source to target, width by |weight|, orange positive, blue negative. Hover shows a node card, a click pins or
unpins a node, pinned nodes group into labelled supernodes and "Subgraph only" shows just them (ui.graph_groups; the
pins and supernodes live in the result's params, which the Neuronpedia JSON writes as qParams pinnedIds / supernodes,
and change through undoable commands on the window's undo stack), and two sliders re-prune what is shown from the
stored adjacency without recomputing the graph. Export writes the plot as PNG, SVG or PDF."""
from __future__ import annotations

from html import escape

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QFileDialog, QHBoxLayout, QLabel, QPushButton, QScrollArea, QSlider, QSplitter,
                               QVBoxLayout, QWidget)

from desktop_app.ui import graph_export
from desktop_app.ui.graph_card import FeatureCards
from desktop_app.ui.graph_groups import SubgraphLayer, SubgraphPanel, edge_curves
from desktop_app.ui.graph_pins import SubgraphEdits

from desktop_app.ui.graph_clamp import ClampPanel, clamp_targets

KIND_COLOURS = {"embedding": (90, 160, 90), "feature": (230, 140, 40), "error": (150, 150, 150),
                "logit": (60, 110, 200)}
POSITIVE, NEGATIVE = (220, 110, 30), (40, 100, 220)
HOVER_PIXELS = 12


def _swatch(colour, text: str, shape: str = "●") -> str:
    return f'<span style="color: rgb{tuple(colour)}">{shape}</span> {text}'


LEGEND_HTML = "&nbsp;&nbsp;".join(
    [_swatch(c, k) for k, c in KIND_COLOURS.items()]
    + [_swatch(POSITIVE, "positive edge", "━"), _swatch(NEGATIVE, "negative edge", "━"),
       _swatch((200, 0, 0), "pinned", "○")])


def visible_nodes(kinds: np.ndarray, influence: np.ndarray, fraction: float, pinned: np.ndarray) -> np.ndarray:
    """Mask: every non-feature node, the pinned ones, and the fewest features carrying `fraction` of the features'
    influence (all features at fraction 1)."""
    is_f = kinds == "feature"
    mask = ~is_f | pinned
    if fraction >= 1.0:
        return mask | is_f
    f_idx = np.where(is_f)[0]
    scores = np.clip(influence[f_idx].astype(np.float64), 0.0, None)
    total = scores.sum()
    if total > 0 and fraction > 0:
        order = np.argsort(-scores, kind="stable")
        count = int(np.searchsorted(np.cumsum(scores[order]), fraction * total * (1 - 1e-12))) + 1
        mask[f_idx[order[:count]]] = True
    return mask


def visible_edges(adjacency: np.ndarray, nodes: np.ndarray, min_fraction: float) -> np.ndarray:
    """Mask [target, source]: nonzero edges between visible nodes with |w| >= min_fraction * max |w|."""
    a = np.abs(adjacency) * nodes[:, None] * nodes[None, :]
    top = a.max() if a.size else 0.0
    return (a > 0) & (a >= min_fraction * top)


class GraphView(SubgraphEdits, QWidget):
    view_type = "graph"
    PREFERRED_HEIGHT = 560  # pixels of the detail dock: layers x tokens, the card and the clamp table readable

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("graphView")
        self.result = None
        self.session = None  # the window's session (attach_session): pins and supernodes become undoable commands
        self.node_mask = np.zeros(0, dtype=bool)
        self.edge_mask = np.zeros((0, 0), dtype=bool)
        self.xy = np.zeros((0, 2))
        self.highlight = None  # the ring around a node whose bar was clicked in the ranking (show_node)
        self.highlighted: int | None = None
        self.title = QLabel("")
        self.title.setWordWrap(True)
        self.title.setObjectName("graphTitle")
        self.legend = QLabel(LEGEND_HTML)
        self.legend.setObjectName("graphLegend")
        self.logit_labels: list[pg.TextItem] = []
        self.card = QLabel("Hover a node for its card; click to pin it.")
        self.card.setObjectName("graphNodeCard")
        self.card.setWordWrap(True)
        self.card.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.node_slider = self._slider("nodeThresholdSlider", 100,
                                        "Show the fewest features carrying this % of the features' influence")
        self.edge_slider = self._slider("edgeThresholdSlider", 0, "Hide edges weaker than this % of the strongest")
        self.node_label, self.edge_label = QLabel(), QLabel()
        self.export_button = QPushButton("Export…")
        self.export_button.setObjectName("graphExportButton")
        self.export_button.clicked.connect(self._ask_export)
        from desktop_app.ui.token_axis import TokenAxis  # every token labelled, rotated when they do not fit

        self.plot_widget = pg.PlotWidget(axisItems={"bottom": TokenAxis("bottom")})
        self.plot_widget.setObjectName("graphPlot")
        self.plot_widget.setBackground("w")
        self.plot = self.plot_widget.getPlotItem()
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.showGrid(x=False, y=True, alpha=0.15)
        self.edge_items: list[pg.PlotCurveItem] = []
        self.pin_item = pg.ScatterPlotItem(pxMode=True)
        self.scatter = pg.ScatterPlotItem(pxMode=True, hoverable=True)
        self.scatter.sigClicked.connect(self._clicked)
        self.plot.addItem(self.scatter)
        self.plot.addItem(self.pin_item)
        self.plot.scene().sigMouseMoved.connect(self._mouse_moved)
        self.layer = SubgraphLayer(self.plot)
        self.layer.unit_scatter.sigClicked.connect(self._unit_clicked)
        # the subgraph's edge labels are placed apart in pixels: place them again when the plot's size changes
        self.plot.getViewBox().sigResized.connect(lambda _vb: self.subgraph_mode() and self.redraw())
        self.layer.unit_scatter.sigHovered.connect(
            lambda _item, points, _ev: len(points) and self.card.setText(
                escape(self.layer.unit_tip(self, int(points[0].data()))).replace("\n", "<br>")))
        self.panel = SubgraphPanel()
        self.panel.group_button.clicked.connect(lambda: self.group_selected())
        self.panel.ungroup_button.clicked.connect(self._ungroup_selected)
        self.panel.rename_button.clicked.connect(lambda: self.rename_selected())
        self.panel.tree.itemDoubleClicked.connect(lambda *_: self.rename_selected())
        self.panel.tree.itemSelectionChanged.connect(self.redraw)
        self.panel.subgraph_check.toggled.connect(self._mode_changed)
        controls = QHBoxLayout()
        for w in (QLabel("Nodes"), self.node_slider, self.node_label, QLabel("Edges"), self.edge_slider,
                  self.edge_label, self.export_button):
            controls.addWidget(w)
        self.cards = FeatureCards(self)
        controls.addWidget(self.cards)
        self.clamp = ClampPanel()
        self.clamp.button.clicked.connect(self.clamp.run)
        # the plot takes the height; beside it the hovered node's card, then the pins over the clamp check
        self.card.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        self.card.setMargin(6)
        card_scroll = QScrollArea()
        card_scroll.setObjectName("graphCardScroll")
        card_scroll.setWidget(self.card)
        card_scroll.setWidgetResizable(True)
        card_scroll.setFrameShape(QScrollArea.NoFrame)
        card_scroll.setMinimumWidth(220)
        side = QSplitter(Qt.Vertical)
        side.addWidget(self.panel)
        side.addWidget(self.clamp)
        side.setSizes([200, 260])
        split = QSplitter(Qt.Horizontal)
        split.setObjectName("graphSplitter")
        for w in (self.plot_widget, card_scroll, side):
            split.addWidget(w)
        split.setStretchFactor(0, 1)
        split.setSizes([800, 300, 340])
        self.plot_widget.setMinimumSize(360, 240)
        layout = QVBoxLayout(self)
        layout.addWidget(self.title)
        layout.addWidget(self.legend)
        layout.addLayout(controls)
        layout.addWidget(split, 1)

    def _slider(self, name: str, value: int, tip: str) -> QSlider:
        s = QSlider(Qt.Horizontal)
        s.setObjectName(name)
        s.setRange(0, 100)
        s.setValue(value)
        s.setToolTip(tip)
        s.valueChanged.connect(lambda _v: self.redraw())
        return s

    # ---- data ------------------------------------------------------------------------------------------------
    def show_result(self, result, others=None) -> None:
        self.result = result
        ex = result.extras
        self.kinds = np.asarray(ex["node_kind"]).astype(str)
        self.ids = [str(i) for i in ex["node_ids"]]
        self.layers = np.asarray(ex["node_layer"], dtype=int)
        self.pos = np.asarray(ex["node_pos"], dtype=int)
        self.feature = np.asarray(ex["node_feature"], dtype=int)
        self.activation = np.asarray(ex["node_activation"], dtype=float)
        self.influence = np.asarray(ex["node_influence"], dtype=float)
        self.adjacency = np.asarray(ex["adjacency"], dtype=np.float64)
        self.tokens = [str(t) for t in ex.get("prompt_tokens", [])]
        texts = ex.get("node_token_text")
        self.token_text = [str(t) for t in texts] if texts is not None and len(texts) == len(self.ids) \
            else [""] * len(self.ids)
        self.n_layers = int(ex["model_n_layers"]) if "model_n_layers" in ex else int(self.layers.max())
        self.xy = self._layout()
        self._axes()
        rs, cs = ex.get("replacement_score"), ex.get("completeness_score")
        scores = "" if rs is None else f"; replacement score {float(rs):.3f}, completeness {float(cs):.3f}"
        model = str(result.params.get("scan") or "unknown model")
        prompt = "".join(self.tokens).replace("·", " ")
        self.title.setText(f"<b>{escape(model)}</b> — “{escape(prompt)}”<br>"
                           f"{escape(result.name)}: {len(self.ids)} nodes, {int((self.adjacency != 0).sum())} edges "
                           f"stored{scores}")
        if self.highlight is not None:  # a ring of the graph shown before
            self.highlight.setData([])
            self.highlighted = None
        self.subgraph_changed()
        self.cards.set_graph(result)

    @property
    def pinned(self) -> list[str]:
        if self.result is None:
            return []
        return [p for p in self.result.params.get("pinned_ids", []) or [] if p in set(self.ids)]

    def _layout(self) -> np.ndarray:
        """x: the position, nodes sharing a (row, position) cell spread over +-0.4; y: layer + 1 (embeddings 0)."""
        rows = self.layers + 1
        xy = np.zeros((len(self.ids), 2))
        xy[:, 1] = rows
        for key in set(zip(rows.tolist(), self.pos.tolist())):
            idx = np.where((rows == key[0]) & (self.pos == key[1]))[0]
            idx = idx[np.argsort(-self.influence[idx], kind="stable")]
            offsets = np.linspace(-0.4, 0.4, len(idx)) if len(idx) > 1 else np.zeros(1)
            xy[idx, 0] = key[1] + offsets
        return xy

    def _axes(self) -> None:
        bottom = self.plot.getAxis("bottom")
        bottom.set_labels(self.tokens, offset=0.0)
        rows = [(0, "emb")] + [(L + 1, f"L{L}") for L in range(self.n_layers)] + [(self.n_layers + 1, "logits")]
        left = self.plot.getAxis("left")
        left.setTicks([rows])
        left.setWidth(48)  # room for "logits"
        self.plot.setLabel("bottom", "token position")
        self.plot.setXRange(-0.6, max(len(self.tokens), int(self.pos.max()) + 1) - 0.4, padding=0.02)
        self.plot.setYRange(-0.5, self.n_layers + 2.0, padding=0.02)  # room above the logits for their labels

    # ---- drawing ---------------------------------------------------------------------------------------------
    def redraw(self) -> None:
        self.node_label.setText(f"{self.node_slider.value()}%")
        self.edge_label.setText(f"≥{self.edge_slider.value()}%")
        if self.result is None:
            return
        for item in self.edge_items + self.logit_labels:
            self.plot.removeItem(item)
        self.edge_items, self.logit_labels = [], []
        self.layer.clear()
        selected = self.panel.selected_group_index()
        if self.subgraph_mode():
            self.node_mask = np.zeros(len(self.ids), dtype=bool)
            self.edge_mask = np.zeros((len(self.ids),) * 2, dtype=bool)
            self.scatter.setData([])
            self.pin_item.setData([])
            self.layer.draw_subgraph(self, self.edge_slider.value() / 100, selected, POSITIVE, NEGATIVE,
                                     KIND_COLOURS)
            self._update_clamp()
            return
        keep = set(self.pinned).union(*(members for _, members in self.supernodes()))  # a file's groups may hold
        pinned = np.array([i in keep for i in self.ids], dtype=bool)  # nodes it did not pin: show them too
        self.node_mask = visible_nodes(self.kinds, self.influence, self.node_slider.value() / 100, pinned)
        self.edge_mask = visible_edges(self.adjacency, self.node_mask, self.edge_slider.value() / 100)
        targets, sources = np.where(self.edge_mask)
        for item in edge_curves(self.xy[sources], self.xy[targets], self.adjacency[targets, sources], POSITIVE,
                                NEGATIVE):
            self.plot.addItem(item)
            self.edge_items.append(item)
        shown = np.where(self.node_mask)[0]
        infl = np.clip(self.influence, 0, None)
        size = 7 + 15 * np.sqrt(infl / infl.max()) if infl.max() > 0 else np.full(len(infl), 8.0)
        self.scatter.setData([{"pos": self.xy[i], "size": float(size[i]), "data": int(i),
                               "brush": pg.mkBrush(*KIND_COLOURS.get(self.kinds[i], (0, 0, 0))),
                               "pen": pg.mkPen("k", width=0.5)} for i in shown])
        for i in shown:
            if self.kinds[i] == "logit":
                label = pg.TextItem(self.logit_label(i), color=KIND_COLOURS["logit"], anchor=(0.5, 1.0))
                label.setPos(self.xy[i, 0], self.xy[i, 1] + 0.15)
                self.plot.addItem(label)
                self.logit_labels.append(label)
        pins = [i for i in shown if pinned[i]]
        self.pin_item.setData([{"pos": self.xy[i], "size": float(size[i]) + 8, "brush": None,
                                "pen": pg.mkPen((200, 0, 0), width=2)} for i in pins])
        self.layer.draw_boxes(self, selected)
        self._update_clamp()

    def _update_clamp(self) -> None:
        self.clamp.set_target(self.result, clamp_targets(self),
                              {int(self.feature[i]): self.logit_label(i) for i in np.where(self.kinds == "logit")[0]})

    def logit_label(self, i: int) -> str:
        """The token text a logit node stands for (its id only when the result carries no text)."""
        return self.token_text[i] or f"#{int(self.feature[i])}"

    def shown_counts(self) -> tuple[int, int]:
        """(nodes, edges) drawn now, read back from the plot items."""
        edges = sum(len(item.getData()[0]) // 2 for item in self.edge_items)
        return len(self.scatter.data), edges

    # ---- interaction -----------------------------------------------------------------------------------------
    def node_card(self, i: int) -> str:
        kind, layer, pos = self.kinds[i], int(self.layers[i]), int(self.pos[i])
        token = self.tokens[pos] if 0 <= pos < len(self.tokens) else "?"
        lines = [f"<b>{self.ids[i]}</b> — {kind}", f"position {pos} ({token!r})"]
        if kind in ("feature", "error"):
            lines.append(f"layer {layer}")
        if kind == "feature":
            lines.append(f"feature {int(self.feature[i])}, activation {self.activation[i]:.4g}")
        elif kind == "logit":
            lines.append(f"output {escape(self.logit_label(i))} (token id {int(self.feature[i])}), "
                         f"probability {self.activation[i]:.4g}")
        elif kind == "embedding":
            lines.append(f"token id {int(self.feature[i])}")
        lines.append(f"influence on the logits {self.influence[i]:.4g}")
        if kind == "feature":
            lines.append(self.cards.html(i))
        lines.append("pinned" if self.ids[i] in self.pinned else "click to pin")
        return "<br>".join(lines)

    def attach(self, window) -> None:
        """Wire the view to the window (ui.kind_views, once): the clamp check and the feature cards run in its runner
        on graphs of the loaded model only, pins and supernodes are undoable edits of its session, and a bar clicked
        in the result pane's ranked nodes rings its node here."""
        from desktop_app.ui.kind_views import computed_with_loaded

        self.clamp.submit = window._submit
        self.clamp.computed_with_loaded = lambda shown: computed_with_loaded(window, shown)
        self.attach_session(window.session)
        window.result_view.node_clicked.connect(lambda shown, i: self.result is shown and self.show_node(i))
        self.cards.attach(window)

    def hover_node(self, i: int | None) -> None:
        self.card.setText(self.node_card(i) if i is not None else " ")

    def show_node(self, i: int) -> None:
        """Show node i's card and ring it (its bar was clicked in the result pane's ranking)."""
        if self.highlight is None:
            self.highlight = pg.ScatterPlotItem(pxMode=True)
            self.plot.addItem(self.highlight)
        self.highlighted = int(i)
        self.highlight.setData([{"pos": self.xy[i], "size": 30, "brush": None,
                                 "pen": pg.mkPen((0, 0, 0), width=2, style=Qt.DashLine)}])
        self.hover_node(i)

    def _mouse_moved(self, scene_pos) -> None:
        if self.result is None or not self.node_mask.any():
            return
        vb = self.plot.getViewBox()
        shown = np.where(self.node_mask)[0]
        pts = [vb.mapViewToScene(pg.Point(*self.xy[i])) for i in shown]
        d = np.array([(p.x() - scene_pos.x()) ** 2 + (p.y() - scene_pos.y()) ** 2 for p in pts])
        j = int(np.argmin(d))
        if d[j] <= HOVER_PIXELS ** 2:
            self.hover_node(int(shown[j]))

    def _clicked(self, _item, points, ev=None) -> None:
        if not len(points):
            return
        node_id = self.ids[int(points[0].data())]
        if ev is not None and ev.modifiers() & (Qt.ControlModifier | Qt.ShiftModifier) and node_id in self.pinned:
            self.panel.select_node(node_id, not self.panel.is_selected(node_id))  # select for Group…
        else:
            self.toggle_pin(node_id)

    # ---- export ----------------------------------------------------------------------------------------------
    def export(self, path) -> None:
        """Write the plot to `path` as PNG, SVG or PDF, by its suffix (ui.graph_export)."""
        graph_export.export_plot(self.plot, path)

    def _ask_export(self) -> None:
        path, chosen = QFileDialog.getSaveFileName(self, "Export the graph", "graph.png",
                                                   ";;".join(graph_export.FILTERS))
        if path:
            self._try(lambda: self.export(graph_export.with_suffix(path, chosen)))
