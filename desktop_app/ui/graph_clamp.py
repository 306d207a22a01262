"""Verify a graph in one click: clamp a pinned feature node to zero (ablate it), re-run the real model in the runner
and show the graph's predicted change of its logits beside the measured one. The graph is exact for the
replacement model (attention patterns and norm scales frozen at the prompt), so the measured change can differ."""
from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QLabel, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

NOTE = ("The graph is exact for the replacement model (attention patterns and norm scales frozen at the prompt); "
        "the real model re-computes them, so the measured change can differ from the predicted one.")


def clamp_job(result, node_id: str):
    """A runner job: engine.graph_check.clamp_check of moving `node_id`'s activation to zero on the loaded model."""
    extras = {k: np.asarray(v) for k, v in result.extras.items()}
    token_ids = [int(i) for i in np.asarray(result.tokens_clean)]
    transcoders = str(result.params.get("transcoders", ""))

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
        s = [str(i) for i in extras["node_ids"]].index(node_id)
        return clamp_check(lm, token_ids, tset, extras, node_id, -float(extras["node_activation"][s]))
    return job


class ClampPanel(QWidget):
    """The button, the predicted / measured table and the note. `submit(job, slot, finished=, errored=)` is wired
    by the window (its JobRouter); without it the button says so."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.submit = None
        self.computed_with_loaded = None  # result -> bool, wired by the window: never run a graph of another model
        self.node_id: str | None = None
        self.check: dict | None = None
        self.button = QPushButton("Clamp ×0 / ablate")
        self.button.setObjectName("graphClampButton")
        self.button.setToolTip("Set the pinned feature's activation to zero in the real model and compare the "
                               "measured change of the logits with the graph's prediction")
        self.button.setEnabled(False)
        self.status = QLabel("Pin a feature node to check it (the last pinned one is clamped).")
        self.status.setObjectName("graphCheckStatus")
        self.status.setWordWrap(True)
        self.table = QTableWidget(0, 3)
        self.table.setObjectName("graphCheckTable")
        self.table.setHorizontalHeaderLabels(["logit", "predicted Δ", "measured Δ"])
        self.table.verticalHeader().setVisible(False)
        self.table.setMaximumHeight(150)
        self.table.setVisible(False)  # until a check fills it: an empty table would take the graph's room
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        for w in (self.button, self.status, self.table):
            layout.addWidget(w)

    def set_target(self, result, node_id: str | None, labels: dict) -> None:
        """The pinned feature to clamp (None: not exactly one pinned feature); labels: token id -> text."""
        self.result, self.labels = result, labels
        self.node_id = node_id
        self.button.setEnabled(node_id is not None)
        if node_id is None:
            self.status.setText("Pin a feature node to check it (the last pinned one is clamped).")
        elif self.check is None or self.check["node_id"] != node_id:
            self.status.setText(f"Clamp {node_id} to zero and compare. {NOTE}")

    def run(self) -> None:
        if self.node_id is None:
            return
        if self.submit is None:
            self.status.setText("This view is not attached to a window's runner; nothing was run.")
            return
        if self.computed_with_loaded is not None and not self.computed_with_loaded(self.result):
            self.status.setText("This graph was not computed with the loaded model, so nothing was run; re-run the "
                                "analysis with this model before checking a node on it.")
            return
        node_id = self.node_id
        self.status.setText(f"Running the model with {node_id} clamped to zero…")
        self.submit(clamp_job(self.result, node_id), "graph_check", finished=self.show_check,
                    errored=lambda message, _details: self.status.setText(message))

    def show_check(self, check: dict) -> None:
        self.check = check
        self.table.setVisible(True)
        tokens = [int(t) for t in check["logit_tokens"]]
        self.table.setRowCount(len(tokens))
        for r, (t, p, m) in enumerate(zip(tokens, check["predicted"], check["measured"])):
            for c, text in enumerate((self.labels.get(t, f"#{t}"), f"{float(p):+.4f}", f"{float(m):+.4f}")):
                self.table.setItem(r, c, QTableWidgetItem(text))
        self.status.setText(f"{check['node_id']} clamped to zero (activation moved by {float(check['delta']):+.4g}). "
                            f"{NOTE}")
