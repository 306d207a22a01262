"""SAE and transcoder training: the dialog that asks for an SAE's settings, and the pane that plots a run live.

The pane receives TrainMetrics events (step, loss, l0, explained_variance, dead_fraction) from the runner and
repaints at most ~30 times a second; events with a `layer` (transcoder training) get one curve per layer.
pyqtgraph is imported when the pane is first built.
"""
from __future__ import annotations

import math
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel,
                               QLineEdit, QPushButton, QSpinBox, QVBoxLayout, QWidget)

CURVES = (("loss", "loss"), ("l0", "L0 (active features per token)"), ("explained_variance", "explained variance"),
          ("dead_fraction", "dead fraction"))
ARCHITECTURES = (("topk", "topk"), ("relu", "standard"))  # shown name -> engine TrainConfig.architecture


def _named(widget, name: str, tip: str):
    widget.setObjectName(name)
    widget.setToolTip(tip)
    return widget


class CorpusAndOutFields:
    """The corpus and output-folder rows of a training dialog, each with a Browse… button (SAEs and transcoders);
    the dialog sets `_start` (the folder dialogs open in) and `OUT_NAME` (the folder proposed inside the chosen one)."""

    OUT_NAME = "sae"

    def _with_browse(self, edit, slot) -> QWidget:
        w = QWidget()
        row = QHBoxLayout(w)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(edit, 1)
        button = QPushButton("Browse…")
        button.clicked.connect(slot)
        row.addWidget(button)
        return w

    def _browse_corpus(self):
        path, _ = QFileDialog.getOpenFileName(self, "Corpus", self._start, "Text corpora (*.txt *.jsonl)")
        if path:
            self.corpus_edit.setText(path)

    def _browse_out(self):
        path = QFileDialog.getExistingDirectory(self, "Output folder", self._start)
        if path:
            self.out_edit.setText(str(Path(path) / self.OUT_NAME))

    def _add_buttons(self, form) -> None:
        """The Train / Cancel buttons and, above them, the line that says what is missing (Train keeps the dialog
        open, with everything typed, until the settings are usable)."""
        self.problem_label = _named(QLabel(""), "trainProblemLabel", "What to fix before training")
        self.problem_label.setWordWrap(True)
        self.problem_label.setStyleSheet("QLabel { color: #b02a37; }")
        self.problem_label.hide()
        form.addRow(self.problem_label)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Train")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        form.addRow(buttons)

    def problem(self) -> str:
        """One sentence on what keeps these settings from training, or ''."""
        if not self.corpus_edit.text().strip() or not self.out_edit.text().strip():
            return "Training needs a corpus file and an output folder; choose both."
        return ""

    def accept(self):
        problem = self.problem()
        self.problem_label.setText(problem)
        self.problem_label.setVisible(bool(problem))
        if not problem:
            super().accept()


class TrainDialog(CorpusAndOutFields, QDialog):
    """Settings of one training run; `settings()` gives the keyword arguments of MainWindow.train_sae."""

    def __init__(self, hooks: list[str], hook: str | None, start_dir: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Train an SAE")
        self.setObjectName("trainSaeDialog")
        self._start = start_dir
        self.hook_combo = _named(QComboBox(), "trainHookCombo", "The hook point whose activations the SAE learns")
        self.hook_combo.addItems(hooks)
        if hook in hooks:
            self.hook_combo.setCurrentText(hook)
        self.corpus_edit = _named(QLineEdit(), "trainCorpusEdit", "A .txt (paragraphs or lines) or .jsonl corpus")
        self.out_edit = _named(QLineEdit(), "trainOutputEdit", "Folder the SAE is written to (SAELens format)")
        self.arch_combo = _named(QComboBox(), "trainArchCombo",
                                 "topk: exactly k features per token; relu: ReLU with an L1 penalty")
        self.arch_combo.addItems([a for a, _ in ARCHITECTURES])
        self.width_spin = _named(QSpinBox(), "trainWidthSpin", "Number of features")
        self.width_spin.setRange(1, 1 << 20)
        self.width_spin.setValue(256)
        self.k_spin = _named(QSpinBox(), "trainKSpin", "topk: active features per token")
        self.k_spin.setRange(1, 4096)
        self.k_spin.setValue(16)
        self.steps_spin = _named(QSpinBox(), "trainStepsSpin", "Optimizer steps")
        self.steps_spin.setRange(1, 10_000_000)
        self.steps_spin.setValue(2000)
        form = QFormLayout(self)
        form.addRow("Hook point", self.hook_combo)
        form.addRow("Corpus", self._with_browse(self.corpus_edit, self._browse_corpus))
        form.addRow("Output folder", self._with_browse(self.out_edit, self._browse_out))
        form.addRow("Architecture", self.arch_combo)
        form.addRow("Width", self.width_spin)
        form.addRow("k", self.k_spin)
        form.addRow("Steps", self.steps_spin)
        self._add_buttons(form)
        self.arch_combo.currentTextChanged.connect(lambda a: form.setRowVisible(self.k_spin, a == "topk"))

    def settings(self) -> dict:
        return dict(hook=self.hook_combo.currentText(), corpus=self.corpus_edit.text().strip(),
                    out_folder=self.out_edit.text().strip(), architecture=self.arch_combo.currentText(),
                    width=self.width_spin.value(), k=self.k_spin.value(), steps=self.steps_spin.value())


class TrainingView(QWidget):
    """Live curves of a training run, a status line and a Cancel button (the window connects it)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("saeTrainingView")
        self.status_label = _named(QLabel("No SAE is being trained."), "trainStatusLabel", "The training run")
        self.status_label.setWordWrap(True)
        self.cancel_button = _named(QPushButton("Stop"), "trainCancelButton",
                                    "Stop training; what is trained so far is saved")
        self.cancel_button.setEnabled(False)
        top = QHBoxLayout()
        top.addWidget(self.status_label, 1)
        top.addWidget(self.cancel_button)
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(4, 4, 4, 4)
        self._layout.addLayout(top)
        self.graphics = None
        self.history: dict[str, list[float]] = {key: [] for key, _ in CURVES}
        self.steps: list[int] = []
        # transcoder training: per layer, its steps and curves (the SAE's single run uses steps / history)
        self.layer_steps: dict[int, list[int]] = {}
        self.layer_history: dict[int, dict[str, list[float]]] = {}
        self.layer_curves: dict[int, dict] = {}
        self._dirty = False
        self._timer = QTimer(self)
        self._timer.setInterval(33)
        self._timer.timeout.connect(self._repaint)
        self._timer.start()

    def _ensure_graphics(self):
        if self.graphics is not None:
            return
        import pyqtgraph as pg

        self.graphics = pg.GraphicsLayoutWidget()
        self.graphics.setObjectName("trainCurves")
        self.graphics.setBackground(None)
        self.graphics.setMinimumHeight(170)  # below this the two rows of titled plots lose their axes
        self.curves, self.plots = {}, {}
        for i, (key, title) in enumerate(CURVES):
            plot = self.graphics.addPlot(row=i // 2, col=i % 2, title=title)
            plot.setMenuEnabled(False)
            plot.hideButtons()
            plot.setLabel("bottom", "step")
            self.plots[key] = plot
            self.curves[key] = plot.plot([], [], pen=pg.mkPen((178, 24, 43), width=2))
        self._layout.addWidget(self.graphics, 1)
        self._wide = False
        self._arrange()

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._arrange()

    def _arrange(self):
        """Four plots in a row when the pane is wide and short (docked at the bottom), else two by two."""
        if self.graphics is None:
            return
        wide = self.width() > 2.5 * self.height()
        if wide == self._wide:
            return
        self._wide = wide
        layout = self.graphics.ci
        for plot in self.plots.values():
            layout.removeItem(plot)
        for i, (key, _) in enumerate(CURVES):
            layout.addItem(self.plots[key], row=0 if wide else i // 2, col=i if wide else i % 2)

    def start(self, text: str):
        self._ensure_graphics()
        self.steps.clear()
        for values in self.history.values():
            values.clear()
        for curves in self.layer_curves.values():
            for key, item in curves.items():
                self.plots[key].removeItem(item)
        self.layer_steps.clear()
        self.layer_history.clear()
        self.layer_curves.clear()
        if self.plots["loss"].legend is not None:
            self.plots["loss"].legend.clear()
        self._dirty = True
        self.status_label.setText(text)
        self.cancel_button.setEnabled(True)

    def add_metrics(self, m) -> None:
        layer = getattr(m, "layer", None)
        if layer is None:
            steps, history = self.steps, self.history
        else:
            steps = self.layer_steps.setdefault(int(layer), [])
            history = self.layer_history.setdefault(int(layer), {key: [] for key, _ in CURVES})
        steps.append(int(m.step))
        for key, _ in CURVES:
            history[key].append(float(getattr(m, key)))
        self._dirty = True

    def finish(self, text: str):
        self.status_label.setText(text)
        self.cancel_button.setEnabled(False)
        self._repaint()

    def _repaint(self):
        if not self._dirty or self.graphics is None:
            return
        self._dirty = False
        for key, curve in self.curves.items():
            curve.setData(self.steps, self.history[key])
        for layer in sorted(self.layer_history):
            if layer not in self.layer_curves:
                self.layer_curves[layer] = self._layer_items(layer)
            for key, item in self.layer_curves[layer].items():
                item.setData(self.layer_steps[layer], self.layer_history[layer][key])

    def _layer_items(self, layer: int) -> dict:
        import pyqtgraph as pg

        pen = pg.mkPen(pg.intColor(layer, hues=max(8, len(self.layer_history)), values=1, maxValue=200), width=2)
        loss = self.plots["loss"]
        if loss.legend is None:
            loss.addLegend(offset=(-4, 4), labelTextSize="8pt")
        items = {key: plot.plot([], [], pen=pen, name=f"layer {layer}" if key == "loss" else None)
                 for key, plot in self.plots.items()}
        loss.legend.setColumnCount(math.ceil((len(self.layer_curves) + 1) / 3))  # at most 3 rows over the curves
        return items
