"""Pinned nodes and supernodes of the graph view: the side panel that lists them (select pinned nodes, Group… with
a label, Ungroup, Rename… or double-click a supernode's name, Subgraph only), and what they add to the plot. In the
full graph a supernode is a labelled dashed box around its members; in subgraph mode each supernode is one
labelled box and each pinned node outside a supernode one dot, joined by the summed weights of the edges between
their members (project.graph_subgraph.unit_adjacency). The state itself lives in the result's params and changes
only through undoable commands (GraphView.edit_subgraph)."""
from __future__ import annotations

from html import escape

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QCheckBox, QHBoxLayout, QPushButton, QTreeWidget, QTreeWidgetItem,
                               QVBoxLayout, QWidget)

from desktop_app.project.graph_subgraph import unit_adjacency, units

GROUP_COLOURS = [(120, 60, 170), (20, 130, 120), (190, 60, 110), (110, 110, 20), (30, 90, 170), (160, 90, 30)]
WIDTH_BUCKETS = (0.25, 0.5, 0.75, 1.0)  # |w| / max |w| up to these -> pen widths 1..4
KEY = Qt.UserRole
UNIT_GAP = 2.4  # token positions between units of one row in subgraph mode


def group_colour(index: int) -> tuple[int, int, int]:
    return GROUP_COLOURS[index % len(GROUP_COLOURS)]


def edge_curves(src_xy: np.ndarray, dst_xy: np.ndarray, weights: np.ndarray, positive, negative) -> list:
    """Line items from src_xy[k] to dst_xy[k], one per (width bucket, sign): width by |w| / max |w|."""
    items = []
    if not len(weights):
        return items
    rel = np.abs(weights) / np.abs(weights).max()
    lower = 0.0
    for width, upper in enumerate(WIDTH_BUCKETS, start=1):
        in_bucket = (rel > lower) & (rel <= upper) if lower else (rel <= upper)
        lower = upper
        for sign, colour in ((1, positive), (-1, negative)):
            sel = in_bucket & (np.sign(weights) == sign)
            if sel.any():
                x = np.column_stack([src_xy[sel, 0], dst_xy[sel, 0]]).ravel()
                y = np.column_stack([src_xy[sel, 1], dst_xy[sel, 1]]).ravel()
                item = pg.PlotCurveItem(x, y, connect="pairs", pen=pg.mkPen((*colour, 150), width=width))
                item.setZValue(-1)
                items.append(item)
    return items


class SubgraphPanel(QWidget):
    """The tree of supernodes (their members below them) and pinned nodes in none; the view wires the buttons."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("graphSubgraphPanel")
        self.tree = QTreeWidget()
        self.tree.setObjectName("graphGroupsTree")
        self.tree.setHeaderLabel("Pinned nodes and supernodes")
        self.tree.setSelectionMode(QTreeWidget.ExtendedSelection)
        self.group_button = QPushButton("Group…")
        self.group_button.setObjectName("graphGroupButton")
        self.group_button.setToolTip("Group the selected pinned nodes into a supernode with a label")
        self.ungroup_button = QPushButton("Ungroup")
        self.ungroup_button.setObjectName("graphUngroupButton")
        self.rename_button = QPushButton("Rename…")
        self.rename_button.setObjectName("graphRenameButton")
        self.subgraph_check = QCheckBox("Subgraph only")
        self.subgraph_check.setObjectName("graphSubgraphCheck")
        self.subgraph_check.setToolTip("Show only the pinned nodes and supernodes, joined by their summed edges")
        self.tree.setToolTip("Click a node in the graph to pin it; Ctrl+click a pinned node (or select rows here) to "
                             "choose the nodes to group")
        self.tree.setMinimumHeight(80)
        buttons = QHBoxLayout()
        for b in (self.group_button, self.ungroup_button, self.rename_button):
            buttons.addWidget(b)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.tree, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.subgraph_check)
        self.tree.itemSelectionChanged.connect(self._enable)
        self._enable()

    def fill(self, pinned: list[str], groups: list[tuple[str, list[str]]], describe) -> None:
        """Rebuild the tree, keeping what was selected; describe(node_id) -> the text of a node's row."""
        keep = {item.data(0, KEY) for item in self.tree.selectedItems()}
        self.tree.blockSignals(True)
        self.tree.clear()
        in_group = set()
        for g, (label, members) in enumerate(groups):
            top = QTreeWidgetItem([f"{label}  ({len(members)})"])
            top.setData(0, KEY, ("group", g))
            top.setForeground(0, pg.mkColor(group_colour(g)))
            top.setToolTip(0, "a supernode: double-click or Rename… to change its label")
            self.tree.addTopLevelItem(top)
            for m in members:
                child = QTreeWidgetItem([describe(m)])
                child.setData(0, KEY, ("node", m))
                top.addChild(child)
                in_group.add(m)
            top.setExpanded(True)
        for p in pinned:
            if p not in in_group:
                item = QTreeWidgetItem([describe(p)])
                item.setData(0, KEY, ("node", p))
                self.tree.addTopLevelItem(item)
        for item in self._items():
            item.setSelected(item.data(0, KEY) in keep)
        self.tree.blockSignals(False)
        self._enable()
        self.tree.itemSelectionChanged.emit()

    def _items(self):
        for i in range(self.tree.topLevelItemCount()):
            top = self.tree.topLevelItem(i)
            yield top
            for j in range(top.childCount()):
                yield top.child(j)

    def selected_node_ids(self) -> list[str]:
        """The pinned nodes selected, with every member of a selected supernode."""
        out = []
        for item in self.tree.selectedItems():
            what, key = item.data(0, KEY)
            if what == "node":
                out.append(key)
            else:
                out += [item.child(j).data(0, KEY)[1] for j in range(item.childCount())]
        return list(dict.fromkeys(out))

    def selected_group_index(self) -> int | None:
        """The supernode selected (its row or one of its members), when the selection is within one supernode."""
        found = set()
        for item in self.tree.selectedItems():
            top = item if item.parent() is None else item.parent()
            what, key = top.data(0, KEY)
            found.add(key if what == "group" else None)
        return found.pop() if len(found) == 1 and None not in found else None

    def select_group(self, index: int) -> None:
        for item in self._items():
            if item.data(0, KEY) == ("group", index):
                item.setSelected(True)

    def select_node(self, node_id: str, on: bool = True) -> None:
        for item in self._items():
            if item.data(0, KEY) == ("node", node_id):
                item.setSelected(on)

    def is_selected(self, node_id: str) -> bool:
        return any(item.data(0, KEY) == ("node", node_id) for item in self.tree.selectedItems())

    def _enable(self) -> None:
        self.group_button.setEnabled(bool(self.selected_node_ids()))
        one = self.selected_group_index() is not None
        self.ungroup_button.setEnabled(one)
        self.rename_button.setEnabled(one)


class Placer:
    """Keeps labels apart at the plot's current scale: remembers where labels and units sit (centres in data units,
    half widths and heights in pixels)."""

    LABEL = (28.0, 9.0)  # a short number's label

    def __init__(self, pixel_size, taken=()):
        sx, sy = pixel_size  # data units per pixel
        ok = np.isfinite([sx, sy]).all() and sx > 0 and sy > 0
        self.sx, self.sy = (float(sx), float(sy)) if ok else (1 / 60, 1 / 50)
        self.taken = list(taken)

    def _clear(self, x, y, size) -> bool:
        w, h = size
        return all(abs(x - tx) / self.sx >= w + tw or abs(y - ty) / self.sy >= h + th for tx, ty, tw, th in self.taken)

    def _take(self, x, y, size):
        self.taken.append((x, y, *size))

    def free(self, x, y, size=LABEL) -> float:
        """The first height from y (stepping up a label's height) where a label at x overlaps none placed."""
        while not self._clear(x, y, size):
            y += 2 * size[1] * self.sy
        self._take(x, y, size)
        return y

    def along(self, a, b) -> tuple[float, float]:
        """(fraction along a -> b, data units above it) where a label overlaps nothing placed."""
        for f in (0.5, 0.35, 0.65, 0.25, 0.75, 0.15, 0.85):
            x, y = a + f * (b - a)
            if self._clear(x, y, self.LABEL):
                self._take(x, y, self.LABEL)
                return f, 0.0
        mid = a + 0.5 * (b - a)
        step = 2.2 * self.LABEL[1] * self.sy
        for k in (1, -1, 2, -2, 3, -3):  # no room on the edge: above or below its middle
            if self._clear(mid[0], mid[1] + k * step, self.LABEL):
                self._take(mid[0], mid[1] + k * step, self.LABEL)
                return 0.5, k * step
        return 0.5, self.free(mid[0], mid[1]) - mid[1]


class SubgraphLayer:
    """The plot items the supernodes add: boxes in the full graph, units and summed edges in subgraph mode."""

    def __init__(self, plot):
        self.plot = plot
        self.items: list = []
        self.units: list[tuple[str, list[int]]] = []
        self.unit_xy = np.zeros((0, 2))
        self.unit_weights = np.zeros((0, 0))
        self.drawn_edges: list[tuple[int, int, float]] = []  # (target unit, source unit, summed weight)
        self.unit_group: list[int] = []
        self.unit_scatter = pg.ScatterPlotItem(pxMode=True, hoverable=True)
        self.unit_scatter.setZValue(3)
        plot.addItem(self.unit_scatter)

    def _add(self, item, z: float = 0.0):
        item.setZValue(z)
        self.plot.addItem(item)
        self.items.append(item)
        return item

    def clear(self) -> None:
        for item in self.items:
            self.plot.removeItem(item)
        self.items, self.drawn_edges = [], []
        self.unit_scatter.setData([])

    # ---- the full graph: a dashed labelled box around each supernode's members --------------------------------
    def draw_boxes(self, view, selected: int | None) -> None:
        placed = Placer(self.plot.getViewBox().viewPixelSize())
        for g, label, idx in self.present_groups(view):
            x0, y0 = view.xy[idx].min(axis=0) - (0.22, 0.2)
            x1, y1 = view.xy[idx].max(axis=0) + (0.22, 0.2)
            colour = group_colour(g)
            pen = pg.mkPen(colour, width=3 if g == selected else 1.5, style=Qt.DashLine)
            self._add(pg.PlotCurveItem([x0, x1, x1, x0, x0], [y0, y0, y1, y1, y0], pen=pen), 0.5)
            text = pg.TextItem(label, color=colour, anchor=(0.0, 1.0), fill=pg.mkBrush(255, 255, 255, 220),
                               border=pg.mkPen(colour))
            half = (4 + 3.6 * len(label), 10.0)  # labels of boxes with the same corner stack up
            text.setPos(x0, placed.free(x0 + half[0] * placed.sx, y1 + half[1] * placed.sy, half) - half[1] * placed.sy)
            self._add(text, 3)

    @staticmethod
    def present_groups(view) -> list[tuple[int, str, list[int]]]:
        """(index in the supernodes list, label, node indices) of the supernodes with a node in this graph."""
        index = {n: i for i, n in enumerate(view.ids)}
        groups = [(g, label, [index[m] for m in members if m in index])
                  for g, (label, members) in enumerate(view.supernodes())]
        return [g for g in groups if g[2]]

    # ---- subgraph mode ------------------------------------------------------------------------------------------
    def draw_subgraph(self, view, min_fraction: float, selected: int | None, positive, negative, kind_colours):
        self.units = units(view.ids, view.pinned, view.supernodes())
        self.unit_weights = unit_adjacency(view.adjacency, [idx for _, idx in self.units])
        self.unit_xy = self._layout(view)
        off = self.unit_weights * (1 - np.eye(len(self.units)))
        a = np.abs(off)
        keep = (a > 0) & (a >= min_fraction * (a.max() if a.size else 0.0))
        targets, sources = np.where(keep)
        weights = off[targets, sources]
        self.drawn_edges = [(int(t), int(s), float(w)) for t, s, w in zip(targets, sources, weights)]
        for item in edge_curves(self.unit_xy[sources], self.unit_xy[targets], weights, positive, negative):
            self._add(item, -1)
        self.unit_group = [g for g, _, _ in self.present_groups(view)]  # units[u] is supernode unit_group[u]
        n_groups = len(self.unit_group)
        placed = Placer(self.plot.getViewBox().viewPixelSize(),
                        [(x, y, *((60.0, 18.0) if u < n_groups else (9.0, 9.0))) for u, (x, y) in
                         enumerate(self.unit_xy)])  # a supernode's box; a dot
        names = [self._name(view, u, placed) for u in range(n_groups, len(self.units))]  # placed before the weights
        for t, s, w in self.drawn_edges:  # the summed weight, where along its edge no other label or unit sits
            a, b = self.unit_xy[s], self.unit_xy[t]
            f, dy = placed.along(a, b)
            label = pg.TextItem(f"{w:+.3g}", color=positive if w > 0 else negative, anchor=(0.5, 0.5),
                                fill=pg.mkBrush(255, 255, 255, 210))
            label.setPos(*(a + f * (b - a) + (0.0, dy)))
            self._add(label, 1)
        spots = []
        for u, (label, idx) in enumerate(self.units[:n_groups]):
            colour = group_colour(self.unit_group[u])
            box = pg.TextItem(html=f'<b>{escape(label)}</b><br><small>{len(idx)} nodes</small>', anchor=(0.5, 0.5),
                              border=pg.mkPen(colour, width=3 if self.unit_group[u] == selected else 1.5),
                              fill=pg.mkBrush(*(int(0.15 * c + 0.85 * 255) for c in colour)))
            box.setColor(colour)
            box.setPos(*self.unit_xy[u])
            box.setToolTip(self.unit_tip(view, u))
            self._add(box, 2)
            spots.append({"pos": self.unit_xy[u], "size": 30, "data": u, "symbol": "s",  # its clickable centre
                          "brush": pg.mkBrush(0, 0, 0, 0), "pen": pg.mkPen(None)})
        for u, name in zip(range(n_groups, len(self.units)), names):
            i = self.units[u][1][0]
            spots.append({"pos": self.unit_xy[u], "size": 14, "data": u,
                          "brush": pg.mkBrush(*kind_colours.get(view.kinds[i], (0, 0, 0))),
                          "pen": pg.mkPen((200, 0, 0), width=2)})
            self._add(name, 2)
        self.unit_scatter.setData(spots, tip=lambda x, y, data: self.unit_tip(view, int(data)))

    def _name(self, view, u: int, placed: Placer):
        """The name of a pinned node's unit: a logit's token above it, an embedding's id below, else its id to the
        right; its place is taken in `placed`."""
        i = self.units[u][1][0]
        text = view.logit_label(i) if view.kinds[i] == "logit" else self.units[u][0]
        x, y = self.unit_xy[u]
        w, h = 4 + 3.6 * len(text), 9.0  # half sizes in pixels
        if view.kinds[i] == "logit":
            anchor, at, centre = (0.5, 1.0), (x, y + h * placed.sy), (x, y + 2 * h * placed.sy)
        elif view.kinds[i] == "embedding":
            anchor, at, centre = (0.5, 0.0), (x, y - h * placed.sy), (x, y - 2 * h * placed.sy)
        else:
            anchor, at, centre = (0.0, 0.5), (x + h * placed.sx, y), (x + (h + w) * placed.sx, y)
        placed.taken.append((*centre, w, h))
        name = pg.TextItem(text, color=(40, 40, 40), anchor=anchor, fill=pg.mkBrush(255, 255, 255, 210))
        name.setPos(*at)
        return name

    def _layout(self, view) -> np.ndarray:
        """A unit sits at the mean position of its members; units of one row are pushed at least UNIT_GAP token
        positions apart (less when the row would not fit the prompt's width), in the order of their positions."""
        xy = np.array([view.xy[idx].mean(axis=0) for _, idx in self.units]).reshape(-1, 2)
        lo, hi = -0.3, max(len(view.tokens), int(view.pos.max()) + 1) - 0.7
        rows: dict[int, list[int]] = {}
        for u, y in enumerate(xy[:, 1]):
            rows.setdefault(round(y * 2), []).append(u)
        for members in rows.values():
            members = sorted(members, key=lambda u: xy[u, 0])
            gap = min(UNIT_GAP, (hi - lo) / max(len(members) - 1, 1))
            x = xy[members, 0].copy()
            for k in range(1, len(x)):
                x[k] = max(x[k], x[k - 1] + gap)
            x -= max(0.0, x[-1] - hi)  # pushed past the right edge: slide the row back
            for k in range(1, len(x)):
                x[k] = max(x[k], x[k - 1] + gap)
            xy[members, 0] = np.clip(x, lo, None)
        return xy

    def unit_tip(self, view, u: int) -> str:
        label, idx = self.units[u]
        w = self.unit_weights
        out_w = w[:, u].sum() - w[u, u]
        in_w = w[u, :].sum() - w[u, u]
        members = ", ".join(view.ids[i] for i in idx[:8]) + (" …" if len(idx) > 8 else "")
        return (f"{label}: {len(idx)} node(s) ({members})\nsummed weight into the other units {out_w:+.4g}, "
                f"from them {in_w:+.4g}")

