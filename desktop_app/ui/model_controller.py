"""The Model and Prompts panes' controllers: small Qt objects with explicit dependencies over the Qt-free session
(project.session.Session). ModelController loads / unloads a model in the runner and tells the session what is
loaded; PromptsController turns prompt typing into undoable edits and shows the tokens as chips.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QFileDialog, QLabel

from desktop_app.project.specs import ModelRef
from desktop_app.project.undo import SetModel, SetPromptField
from desktop_app.ui import worker_jobs

TOKENIZE_DEBOUNCE_MS = 150


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


@dataclass
class StatusLabels:
    device: QLabel
    memory: QLabel
    job: QLabel


class ModelController:
    """Dependencies: the session, `submit(job, slot, **handlers)` and `cancel_slot(slot)` of the runner, the Model
    and Layers panels, the status labels, `messages` (show_error, clear), and `on_loaded` / `on_unloaded`
    callbacks (tokens, SAEs). The loaded model is `self.loaded` (worker_jobs.ModelLoaded) and `self.ref`."""

    def __init__(self, session, submit: Callable, cancel_slot: Callable, model_panel, layer_panel,
                 status: StatusLabels, messages, on_loaded: list[Callable], on_unloaded: list[Callable],
                 dialog_parent=None):
        self.session, self.submit, self.cancel_slot = session, submit, cancel_slot
        self.panel, self.layer_panel, self.status, self.messages = model_panel, layer_panel, status, messages
        self.on_loaded, self.on_unloaded, self.dialog_parent = on_loaded, on_unloaded, dialog_parent
        self.loaded: worker_jobs.ModelLoaded | None = None
        self.ref: ModelRef | None = None
        m = model_panel
        m.load_button.clicked.connect(self.load)
        m.unload_button.clicked.connect(self.unload)
        m.path_edit.returnPressed.connect(self.load)
        m.browse_button.clicked.connect(lambda: self.browse(gguf=False))
        m.browse_gguf_button.clicked.connect(lambda: self.browse(gguf=True))

    def ref_from_panel(self) -> ModelRef | None:
        m = self.panel
        path = m.path_edit.text().strip()
        if not path:
            return None
        return ModelRef(path=path, dtype=m.dtype_combo.currentText(), device=m.device_combo.currentText().strip()
                        or "auto", trust_remote_code=m.trust_check.isChecked(), quantize=m.quantize_combo.currentText())

    def show_ref(self, ref: ModelRef) -> None:
        m = self.panel
        m.path_edit.setText(ref.path)
        m.dtype_combo.setCurrentText(ref.dtype)
        m.quantize_combo.setCurrentText(ref.quantize)
        m.device_combo.setCurrentText(ref.device)
        m.trust_check.setChecked(ref.trust_remote_code)

    def load(self):
        try:
            ref = self.ref_from_panel()
        except Exception as err:  # noqa: BLE001 - a SpecError from a bad device string
            self.messages.show_error(str(err))
            return
        if ref is None:
            self.messages.show_error("no model path is given; type a model folder or .gguf file, or click Folder….")
            return
        self.cancel_slot("analysis")
        m = self.panel
        m.progress.setValue(0)
        m.load_button.setEnabled(False)
        self.messages.clear()
        self.status.job.setText("loading model")
        job = worker_jobs.load_model(ref.path, ref.dtype, ref.device, ref.trust_remote_code, ref.quantize)
        self.submit(job, "model",
                    progress=lambda d, t, msg: (m.progress.setMaximum(max(t, 1)), m.progress.setValue(d),
                                                m.progress.setFormat(f"{msg} %p%")),
                    note=lambda event: self._unloaded() if isinstance(event, worker_jobs.ModelDropped) else None,
                    finished=lambda info: self._loaded(ref, info),
                    errored=self._failed, cancelled=lambda _v: self._failed("loading was cancelled"))

    def _loaded(self, ref: ModelRef, info: worker_jobs.ModelLoaded):
        m = self.panel
        m.load_button.setEnabled(True)
        m.unload_button.setEnabled(True)
        m.progress.setValue(m.progress.maximum())
        m.progress.setFormat("loaded")
        m.summary.setText(info.summary + ("\n" + info.conformance_text.split("\n")[0] if info.conformance_text else ""))
        m.summary.setToolTip(info.conformance_text)
        self.loaded = info
        self.ref = dataclasses.replace(ref, config_hash=info.config_hash, conformance=info.conformance,
                                       memory_bytes=info.memory_bytes)
        project = self.session.project
        if project.model != self.ref and not project.learn_config_hash(self.ref):
            self.session.push(SetModel(project, self.ref))
        self.session.set_loaded(self.ref)
        self.layer_panel.set_tree(info.tree, project.view("selected_hooks", []))
        self.status.device.setText(f"device: {info.device}")
        quantized = info.info.get("quantize", "none")
        self.status.memory.setText(f"weights: {human_bytes(info.memory_bytes)}"
                                   + (f" ({quantized})" if quantized != "none" else ""))
        self.status.job.setText("model loaded")
        for callback in self.on_loaded:
            callback()

    def _failed(self, message: str, details: str = ""):
        m = self.panel
        m.load_button.setEnabled(True)
        m.progress.setValue(0)
        if self.loaded is not None:  # failed before the loaded model was let go: it is still there
            kept = self.ref.path
            m.progress.setFormat(f"kept {Path(kept).name}")
            m.path_edit.setText(kept)
            message = f"{message.rstrip()} The model {kept} is still loaded."
        else:
            m.progress.setFormat("not loaded")
        self.status.job.setText("load failed")
        self.messages.show_error(message, details)

    def unload(self):
        self.cancel_slot("analysis")
        self.submit(worker_jobs.unload_model(), "model", finished=lambda _v: self._unloaded())

    def _unloaded(self):
        self.loaded = self.ref = None
        self.session.set_loaded(None)
        m = self.panel
        m.summary.setText("No model loaded.")
        m.unload_button.setEnabled(False)
        m.progress.setValue(0)
        self.layer_panel.set_tree(None)
        self.status.device.setText("no model")
        self.status.memory.setText("")
        for callback in self.on_unloaded:
            callback()

    def browse(self, gguf: bool = False):
        start = self.panel.path_edit.text() or str(Path.home())
        if gguf:
            path, _ = QFileDialog.getOpenFileName(self.dialog_parent, "Open a GGUF model", start,
                                                  "GGUF models (*.gguf)")
        else:
            path = QFileDialog.getExistingDirectory(self.dialog_parent, "Open a model folder", start)
        if path:
            self.panel.path_edit.setText(path)
            self.load()


class PromptsController:
    """Dependencies: the session, the Prompts panel, `submit` of the runner and `is_loaded()`. Typing becomes
    undoable prompt edits (a burst of typing merges into one); tokens are asked for after a pause."""

    def __init__(self, session, prompts_panel, submit: Callable, is_loaded: Callable[[], bool], parent=None):
        self.session, self.panel, self.submit, self.is_loaded = session, prompts_panel, submit, is_loaded
        self.token_problems: list[str] = []
        self._syncing = False
        self.timer = QTimer(parent)
        self.timer.setSingleShot(True)
        self.timer.setInterval(TOKENIZE_DEBOUNCE_MS)
        self.timer.timeout.connect(self.request_tokens)
        for field, edit in prompts_panel.edits().items():
            edit.textChanged.connect(lambda text, f=field: self._edited(f, text))

    def _edited(self, field: str, text: str):
        if self._syncing:
            return
        project = self.session.project
        if getattr(project.prompts, field) != text:
            self.session.push(SetPromptField(project, field, text))
        self.timer.start()

    def sync_to_edits(self):
        """Show the document's prompts in the fields (after undo / redo, or a newly opened project)."""
        self._syncing = True
        try:
            for field, edit in self.panel.edits().items():
                value = getattr(self.session.project.prompts, field) or ""
                if edit.text() != value:
                    edit.setText(value)
        finally:
            self._syncing = False

    def request_tokens(self):
        if not self.is_loaded():
            self.panel.clear_chips("load a model to see the tokens")
            return
        pr = self.session.project.prompts
        texts = {"clean": pr.clean, "corrupted": pr.corrupted, "answer": pr.answer, "wrong_answer": pr.wrong_answer}
        self.submit(worker_jobs.tokenize(texts, pr.prepend_bos), "tokenize", finished=self._show_tokens)

    def _show_tokens(self, tok: worker_jobs.Tokenized | None):
        p = self.panel
        if tok is None:
            return
        clean, corrupted = tok.tokens.get("clean", []), tok.tokens.get("corrupted", [])
        p.clean_chips.set_tokens(clean, tok.errors.get("clean", ""))
        note = tok.errors.get("corrupted", "")
        if clean and corrupted and len(clean) != len(corrupted):
            note = (f"the clean prompt is {len(clean)} tokens and the corrupted prompt {len(corrupted)}; "
                    "they must be the same length")
        p.corrupted_chips.set_tokens(corrupted, note)
        notes, parts = [], []
        for field, label in (("answer", "answer"), ("wrong_answer", "wrong answer")):
            pieces = tok.tokens.get(field)
            if pieces is None:
                continue
            parts.append((label, pieces))
            if len(pieces) != 1:
                notes.append(f"the {label} is {len(pieces)} tokens; it must be one")
        p.answer_chips.set_tokens([t for _, pieces in parts for t in pieces], "; ".join(notes),
                                  prefix="tokens: " if parts else "", positions=False)
        self.token_problems = [n for n in [note] + notes if n]

