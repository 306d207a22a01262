"""Verify a graph in one click: clamp the pinned feature, or the selected supernode, to a value (0 = ablate) or a
multiple of its activation, re-run the model in the runner, and show per logit the graph's predicted change beside
three measured ones (engine.graph_check: the graph's own model, the real model with attention and norms frozen,
the real model)."""
from __future__ import annotations

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QHBoxLayout, QLabel, QPushButton, QSizePolicy,
                               QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

NOTE = ("Exact: the graph's own model (attention patterns and norm scales frozen, MLPs = transcoder features + fixed "
        "errors) follows the full graph unless a feature crosses its threshold; 'predicted' sums only the edges this "
        "pruned graph kept. The real model uses its MLPs (frozen column), then also live attention and norms (last).")
COLUMNS = [("logit", "The graph's logit node (next-token logit at the last position)"),
           ("predicted Δ\n(graph edges)", "Sum over the paths of the shown (pruned) graph, embeddings and errors "
                                           "fixed"),
           ("measured Δ\ngraph's model", "Frozen attention and norm scales, MLPs = transcoders + fixed errors: exact "
                                         "for the full graph unless a feature crossed its threshold"),
           ("measured Δ\nreal, frozen attn+norms", "The real MLPs, with attention patterns and norm scales frozen"),
           ("measured Δ\nreal model", "The real model, nothing frozen")]
MEASURED = ("predicted", "measured_graph", "measured_frozen", "measured_real")
SET, MULTIPLY = "set activation to", "multiply activation by"


def clamp_targets(view) -> list[str]:
    """The feature nodes to clamp in a graph view: the selected supernode's features when the view has a selected
    group (`view.selected_group()`: (label, node ids), or None), else the last pinned feature."""
    kinds = dict(zip(view.ids, view.kinds))
    group = view.selected_group()
    if group:
        return [str(n) for n in group[1] if kinds.get(str(n)) == "feature"]
    pinned = [p for p in view.pinned if kinds.get(p) == "feature"]
    return pinned[-1:]


def clamp_job(result, node_ids: list[str], deltas: list[float]):
    """A runner job: engine.graph_check.clamp_check of moving each node's activation by its delta (all at once) on
    the loaded model."""
    extras = {k: np.asarray(v) for k, v in result.extras.items()}
    token_ids = [int(i) for i in np.asarray(result.tokens_clean)]
    transcoders = str(result.params.get("transcoders", ""))
    node_ids, deltas = list(node_ids), [float(d) for d in deltas]

    def job(state, cancel):
        from desktop_app.engine.errors import ModelLoadError, SpecError
        from desktop_app.engine.graph_check import clamp_check
        from desktop_app.engine.transcoders import load_transcoder_set

        lm = state.lm
        if lm is None:
            raise ModelLoadError("no model is loaded; load the graph's model to check it.")
        if not token_ids or not transcoders:
            raise SpecError("this graph carries no prompt token ids or transcoder set (an opened JSON); compute "
                            "it in the app to check it on the model.")
        tset = load_transcoder_set(transcoders, n_layers=lm.info.n_layers, d_model=lm.info.d_model)
        cancel.check()
        return clamp_check(lm, token_ids, tset, extras, node_ids, deltas, cancel=cancel)
    return job


class ClampPanel(QWidget):
    """The clamp controls, the predicted / measured table and the note. `submit(job, slot, finished=, errored=)` is
    wired by the window (its JobRouter); without it the button says so."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.submit = None
        self.computed_with_loaded = None  # result -> bool, wired by the window: never run a graph of another model
        self.result = None
        self.labels: dict = {}
        self.node_ids: list[str] = []
        self.check: dict | None = None
        self.mode = QComboBox()
        self.mode.setObjectName("graphClampMode")
        self.mode.addItems([SET, MULTIPLY])
        self.mode.setToolTip("Set each clamped feature's activation to the value (0 = ablate), or multiply it")
        self.value = QDoubleSpinBox()
        self.value.setObjectName("graphClampValue")
        self.value.setRange(-1e4, 1e4)
        self.value.setDecimals(3)
        self.value.setValue(0.0)
        self.value.setToolTip("0 with 'set activation to' ablates; 2 with 'multiply' doubles the activation")
        self.mode.currentTextChanged.connect(lambda _t: self._describe())
        self.value.valueChanged.connect(lambda _v: self._describe())
        self.button = QPushButton("Clamp / ablate")
        self.button.setObjectName("graphClampButton")
        self.button.setToolTip("Clamp the selected supernode (else the last pinned feature) in the model and compare "
                               "the measured change of the logits with the graph's prediction")
        self.button.setEnabled(False)
        self.status = QLabel()
        self.status.setObjectName("graphCheckStatus")
        self.status.setWordWrap(True)
        self.status.setAlignment(Qt.AlignLeft | Qt.AlignTop)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("graphCheckTable")
        self.table.setHorizontalHeaderLabels([c for c, _ in COLUMNS])
        for i, (_c, tip) in enumerate(COLUMNS):
            self.table.horizontalHeaderItem(i).setToolTip(tip)
        self.table.verticalHeader().setVisible(False)
        self.table.setMaximumHeight(170)
        self.table.setMinimumHeight(90)
        controls = QHBoxLayout()
        for w in (self.mode, self.value, self.button):
            controls.addWidget(w)
        controls.addStretch(1)
        row = QHBoxLayout()  # the table beside its explanation: the graph above keeps the height
        row.addWidget(self.table, 0)
        row.addWidget(self.status, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(controls)
        layout.addLayout(row)
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Maximum)  # the graph above keeps the spare height
        self._describe()

    def set_target(self, result, node_ids, labels: dict) -> None:
        """The feature nodes to clamp together: one id, a list (a supernode), or None / [] for none; labels: token id
        -> text."""
        self.result, self.labels = result, labels
        self.node_ids = [node_ids] if isinstance(node_ids, str) else [str(n) for n in (node_ids or [])]
        self.button.setEnabled(bool(self.node_ids))
        if self.check is None or list(self.check["node_ids"]) != self.node_ids:
            self._describe()

    def deltas(self) -> list[float]:
        """Per target node: the change of its activation that the mode and value ask for."""
        ids = [str(i) for i in self.result.extras["node_ids"]]
        act = np.asarray(self.result.extras["node_activation"], dtype=np.float64)
        a = [float(act[ids.index(n)]) for n in self.node_ids]
        v = float(self.value.value())
        return [v - x for x in a] if self.mode.currentText() == SET else [(v - 1.0) * x for x in a]

    def what(self) -> str:
        targets = self.node_ids[0] if len(self.node_ids) == 1 else f"{len(self.node_ids)} features"
        v = self.value.value()
        if self.mode.currentText() == SET:
            return f"{targets} ablated" if v == 0 else f"{targets} set to {v:g}"
        return f"{targets} multiplied by {v:g}"

    def _describe(self) -> None:
        if not self.node_ids:
            self.status.setText("Pin a feature node or select a supernode to check it (the last pinned feature is "
                                "clamped).")
        else:
            self.status.setText(f"Clamp: {self.what()}. {NOTE}")

    def run(self) -> None:
        if not self.node_ids:
            return
        if self.submit is None:
            self.status.setText("This view is not attached to a window's runner; nothing was run.")
            return
        if self.computed_with_loaded is not None and not self.computed_with_loaded(self.result):
            self.status.setText("This graph was not computed with the loaded model, so nothing was run; re-run the "
                                "analysis with this model before checking a node on it.")
            return
        what = self.what()
        self.status.setText(f"Running the model with {what}…")
        self.submit(clamp_job(self.result, self.node_ids, self.deltas()), "graph_check",
                    finished=lambda check: self.show_check(check, what),
                    errored=lambda message, _details: self.status.setText(message))

    def show_check(self, check: dict, what: str = "") -> None:
        self.check = check
        tokens = [int(t) for t in check["logit_tokens"]]
        self.table.setRowCount(len(tokens))
        for r, t in enumerate(tokens):
            texts = [self.labels.get(t, f"#{t}")] + [f"{float(check[k][r]):+.4f}" for k in MEASURED]
            for c, text in enumerate(texts):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.table.resizeColumnsToContents()
        width = sum(self.table.columnWidth(c) for c in range(self.table.columnCount()))
        self.table.setFixedWidth(width + 2 * self.table.frameWidth() + 2)
        rows = sum(self.table.rowHeight(r) for r in range(len(tokens)))
        self.table.setMaximumHeight(min(170, self.table.horizontalHeader().height() + rows + 2 * self.table.frameWidth()))
        self.status.setText(f"{what or ', '.join(check['node_ids']) + ' clamped'}. {check['crossing_text']} {NOTE}")
