"""Transcoder training from the window: a small settings dialog and the controller that runs a
`transcoder_training` analysis (added to the project, undoably) with its curves live in the training view.

A cancelled run keeps the transcoders trained so far as a set in the output folder; the view and the message
bar say where (training_live.LiveTraining, for every way a transcoder_training run starts).
"""
from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QComboBox, QDialog, QDoubleSpinBox, QFormLayout, QLineEdit, QSpinBox

from desktop_app.engine.errors import WorkbenchError
from desktop_app.ui import spec_form
from desktop_app.ui.training_live import live_training_of
from desktop_app.ui.training_view import CorpusAndOutFields, _named


def parse_layers(text: str) -> tuple[int, ...] | None:
    """'' or 'all' -> None (every layer); '0, 2' -> (0, 2); else SpecError (one sentence, spec_form.parse_layers)."""
    return None if text.strip().lower() == "all" else spec_form.parse_layers(text.strip())


class TranscoderTrainDialog(CorpusAndOutFields, QDialog):
    """Settings of one run; `settings()` gives the keyword arguments of TranscoderTrainer.train."""

    OUT_NAME = "transcoders"

    def __init__(self, start_dir: str, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Train transcoders")
        self.setObjectName("trainTranscodersDialog")
        self._start = start_dir
        self.corpus_edit = _named(QLineEdit(), "tcCorpusEdit", "A .txt (paragraphs or lines) or .jsonl corpus")
        self.out_edit = _named(QLineEdit(), "tcOutputEdit", "Folder the transcoder set is written to "
                                                            "(circuit-tracer format)")
        self.arch_combo = _named(QComboBox(), "tcArchCombo", "topk: exactly k features per token; jumprelu: a "
                                                             "learned threshold per feature with an L0 penalty")
        self.arch_combo.addItems(["topk", "jumprelu"])
        self.width_spin = _named(QSpinBox(), "tcWidthSpin", "Features per layer")
        self.width_spin.setRange(1, 1 << 20)
        self.width_spin.setValue(256)
        self.k_spin = _named(QSpinBox(), "tcKSpin", "topk: active features per token")
        self.k_spin.setRange(1, 4096)
        self.k_spin.setValue(16)
        self.l0_spin = _named(QDoubleSpinBox(), "tcL0Spin", "jumprelu: the L0 (sparsity) coefficient")
        self.l0_spin.setDecimals(4)
        self.l0_spin.setRange(0.0, 1000.0)
        self.l0_spin.setValue(1.0)
        self.steps_spin = _named(QSpinBox(), "tcStepsSpin", "Optimizer steps")
        self.steps_spin.setRange(1, 10_000_000)
        self.steps_spin.setValue(2000)
        self.layers_edit = _named(QLineEdit(), "tcLayersEdit", "Layers to train, e.g. 0, 2 (empty: every layer; "
                                                               "some layers replace them in the set in the folder)")
        self.skip_check = _named(QCheckBox("train a linear skip (W_skip)"), "tcSkipCheck",
                                 "Also learn a linear map from the MLP input to its output")
        form = QFormLayout(self)
        form.addRow("Corpus", self._with_browse(self.corpus_edit, self._browse_corpus))
        form.addRow("Output folder", self._with_browse(self.out_edit, self._browse_out))
        form.addRow("Architecture", self.arch_combo)
        form.addRow("Width", self.width_spin)
        form.addRow("k", self.k_spin)
        form.addRow("L0 coefficient", self.l0_spin)
        form.addRow("Steps", self.steps_spin)
        form.addRow("Layers", self.layers_edit)
        form.addRow("", self.skip_check)
        self._add_buttons(form)

        def arch_changed(arch):
            form.setRowVisible(self.k_spin, arch == "topk")
            form.setRowVisible(self.l0_spin, arch == "jumprelu")
        self.arch_combo.currentTextChanged.connect(arch_changed)
        arch_changed(self.arch_combo.currentText())

    def problem(self) -> str:
        try:
            parse_layers(self.layers_edit.text())
        except WorkbenchError as err:
            return str(err)
        return super().problem()

    def settings(self) -> dict:
        return dict(corpus=self.corpus_edit.text().strip(), out_folder=self.out_edit.text().strip(),
                    architecture=self.arch_combo.currentText(), width=self.width_spin.value(), k=self.k_spin.value(),
                    l0=self.l0_spin.value(), steps=self.steps_spin.value(), layers=self.layers_edit.text(),
                    skip=self.skip_check.isChecked())


class TranscoderTrainer:
    """Dependencies: `model()` (the loaded model or None), `run_spec(spec)` (AnalysisController.run_spec),
    `project()`, the training view and its dock, `resize_docks` (the window's resizeDocks), `messages`, the job
    label, `start_dir()` and the dialogs' parent. The curves, the end and a Stop are shown by the controller's
    LiveTraining (training_live), as for a transcoder_training run from the Analysis panel."""

    def __init__(self, model, run_spec, project, training_view, train_dock, resize_docks, messages, job_label,
                 start_dir, parent):
        self.model, self.run_spec, self.project, self.messages = model, run_spec, project, messages
        self.start_dir, self.parent = start_dir, parent
        self.live = live_training_of(run_spec, training_view, train_dock, resize_docks, messages, job_label)

    def dialog(self):
        if self.model() is None:
            self.messages.show_error("no model is loaded; load the model whose MLPs the transcoders should learn.")
            return
        dialog = TranscoderTrainDialog(self.start_dir(), self.parent)
        if dialog.exec() == QDialog.Accepted:
            self.train(**dialog.settings())

    def train(self, corpus, out_folder, architecture: str = "topk", width: int = 256, k: int = 16, l0: float = 1.0,
              steps: int = 2000, layers=None, skip: bool = False, **fields) -> int | None:
        """Train transcoders of the loaded model on a local corpus, writing a set to out_folder; curves per layer
        fill in live. `fields`: other transcoder_training fields (batch_size, lr, buffer_tokens, context ...)."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; load the model whose MLPs the transcoders should learn.")
            return None
        if not str(corpus).strip() or not str(out_folder).strip():
            self.messages.show_error("transcoder training needs a corpus file and an output folder; choose both.")
            return None
        from desktop_app.project.kinds import get

        try:
            chosen = parse_layers(layers) if isinstance(layers, str) else (tuple(layers) if layers else None)
            spec = get("transcoder_training").spec(
                name="transcoder training", corpus=str(corpus), out=str(out_folder), architecture=architecture,
                width=int(width), k=min(int(k), int(width)), l0=float(l0), steps=int(steps), layers=chosen,
                skip=bool(skip), **fields)
        except (TypeError, ValueError, WorkbenchError) as err:  # a bad setting: one sentence
            self.messages.show_error(str(err))
            return None
        return self.run_spec(spec)
