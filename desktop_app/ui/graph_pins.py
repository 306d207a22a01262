"""The graph view's pins and supernodes as edits: each one (pin, unpin, group, ungroup, rename) is a
project.graph_subgraph.SetSubgraph command on the window's undo stack, whose undo and redo redraw the view; the
panel's buttons and dialogs; the supernode selected (for the clamp check); subgraph mode."""
from __future__ import annotations

from html import escape

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QInputDialog

from desktop_app.engine.errors import WorkbenchError
from desktop_app.project import graph_subgraph as sg


class SubgraphEdits:
    """GraphView's pins and supernodes: undoable edits of the result's params (commands on the window's undo stack
    once attach_session is called), the panel's buttons, and subgraph mode. Mixed into GraphView, whose fields
    (result, ids, kinds, panel, layer, card, plot) and drawing (redraw, _axes, hover_node, logit_label) it uses."""

    def supernodes(self) -> list[tuple[str, list[str]]]:
        """(label, member node ids) of each supernode, as the JSON's qParams.supernodes lists them."""
        return sg.supernodes_of(self.result.params if self.result is not None else None)

    def selected_group(self) -> tuple[str, list[str]] | None:
        """The supernode selected in the panel (its row or a member's), else None."""
        g = self.panel.selected_group_index()
        groups = self.supernodes()
        return groups[g] if g is not None and g < len(groups) else None

    def subgraph_mode(self) -> bool:
        return self.panel.subgraph_check.isChecked()

    def _mode_changed(self, subgraph: bool) -> None:
        """Subgraph mode zooms to the units (the full graph's range comes back when it ends)."""
        self.redraw()
        if self.result is None:
            return
        if subgraph and len(self.layer.unit_xy):
            xs = self.layer.unit_xy[:, 0]
            self.plot.setXRange(xs.min() - 1.0, xs.max() + 1.5, padding=0.02)  # room for the names on the right
            self.redraw()
        elif not subgraph:
            self._axes()

    def _unit_clicked(self, _item, points, ev=None) -> None:
        """Select the unit in the panel (a supernode through one of its members); Ctrl / Shift adds to it."""
        if len(points):
            u = int(points[0].data())
            if ev is None or not ev.modifiers() & (Qt.ControlModifier | Qt.ShiftModifier):
                self.panel.tree.clearSelection()
            if u < len(self.layer.unit_group):
                self.panel.select_group(self.layer.unit_group[u])
            else:
                self.panel.select_node(self.ids[self.layer.units[u][1][0]])

    def attach_session(self, session) -> None:
        """Edits go to `session`'s undo stack, and its undo / redo of them redraw this view."""
        self.session = session
        session.subscribe(self._session_event)

    def _session_event(self, _session, event, detail) -> None:
        if event == "document" and detail[0] == "result_params" and detail[1] == self._analysis_name():
            self.subgraph_changed()

    def _analysis_name(self) -> str | None:
        if self.session is None or self.result is None:
            return None
        return next((e.name for e in self.session.project.analyses if e.result is self.result), None)

    def edit_subgraph(self, state: tuple[list, list], text: str) -> None:
        """Make (pinned, supernodes) the graph's subgraph: a command on the window's undo stack, or a plain edit of
        the result when this view shows a result outside a window's project."""
        name = self._analysis_name()
        if name is None:
            self.result.params.update(sg.as_params(*state))
            self.subgraph_changed()
        else:
            self.session.push(sg.SetSubgraph(self.session.project, name, *state, text))

    def subgraph_changed(self) -> None:
        """Show the params' pins and supernodes (after an edit, undo or redo)."""
        describe = {n: f"{n}  ({self.logit_label(i) if self.kinds[i] == 'logit' else self.kinds[i]})"
                    for i, n in enumerate(self.ids)}
        self.panel.fill(self.pinned, self.supernodes(), lambda n: describe.get(n, f"{n} (not in this graph)"))
        self.redraw()

    def _state(self) -> tuple[list, list]:
        return sg.pinned_of(self.result.params), self.supernodes()

    def toggle_pin(self, node_id: str) -> None:
        pinning = node_id not in self.pinned
        self.edit_subgraph(sg.toggled(*self._state(), node_id), f"{'Pin' if pinning else 'Unpin'} {node_id}")
        self.hover_node(self.ids.index(node_id))

    def group(self, node_ids: list[str], label: str) -> None:
        self.edit_subgraph(sg.grouped(*self._state(), label, node_ids), f"Group {len(node_ids)} nodes as {label}")

    def ungroup(self, index: int) -> None:
        state = sg.ungrouped(*self._state(), index)
        self.edit_subgraph(state, f"Ungroup {self.supernodes()[index][0]}")

    def rename_group(self, index: int, label: str) -> None:
        self.edit_subgraph(sg.renamed(*self._state(), index, label), f"Rename supernode to {label}")

    def group_selected(self, label: str | None = None) -> None:
        ids = self.panel.selected_node_ids()
        if label is None:
            label, ok = QInputDialog.getText(self, "Group into a supernode", f"Label of the {len(ids)} nodes:")
            if not ok:
                return
        self._try(lambda: self.group(ids, label))

    def _ungroup_selected(self) -> None:
        g = self.panel.selected_group_index()
        if g is not None:
            self._try(lambda: self.ungroup(g))

    def rename_selected(self, label: str | None = None) -> None:
        g = self.panel.selected_group_index()
        if g is None:
            return
        if label is None:
            label, ok = QInputDialog.getText(self, "Rename the supernode", "Label:", text=self.supernodes()[g][0])
            if not ok:
                return
        self._try(lambda: self.rename_group(g, label))

    def _try(self, edit) -> None:
        try:
            edit()
        except WorkbenchError as err:  # a bad edit or a file that cannot be written: one sentence on the card
            self.card.setText(escape(str(err)))

