"""Model and prompts in the main window: load / unload a model in the runner, and the prompt fields (undoable
edits through the project, debounced tokenization shown as chips). A mixin of MainWindow.
"""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from desktop_app.project.specs import ModelRef
from desktop_app.project.undo import SetPromptField
from desktop_app.ui import worker_jobs


def human_bytes(n: int) -> str:
    for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


class ModelMixin:
    # ---- model
    def model_ref_from_panel(self) -> ModelRef | None:
        m = self.model_panel
        path = m.path_edit.text().strip()
        if not path:
            return None
        return ModelRef(path=path, dtype=m.dtype_combo.currentText(), device=m.device_combo.currentText().strip()
                        or "auto", trust_remote_code=m.trust_check.isChecked())

    def load_model(self):
        try:
            ref = self.model_ref_from_panel()
        except Exception as err:  # noqa: BLE001 - a SpecError from a bad device string
            self.show_error(str(err))
            return
        if ref is None:
            self.show_error("no model path is given; type a model folder or .gguf file, or click Folder….")
            return
        self.runner.cancel_slot("analysis")
        m = self.model_panel
        m.progress.setValue(0)
        m.load_button.setEnabled(False)
        self.message_bar.clear()
        self.job_label.setText("loading model")
        job = worker_jobs.load_model(ref.path, ref.dtype, ref.device, ref.trust_remote_code)
        self._submit(job, "model",
                     progress=lambda d, t, msg: (m.progress.setMaximum(max(t, 1)), m.progress.setValue(d),
                                                 m.progress.setFormat(f"{msg} %p%")),
                     finished=lambda info: self._model_loaded(ref, info),
                     errored=self._model_failed, cancelled=lambda _v: self._model_failed("loading was cancelled"))

    def _model_loaded(self, ref: ModelRef, info: worker_jobs.ModelLoaded):
        m = self.model_panel
        m.load_button.setEnabled(True)
        m.unload_button.setEnabled(True)
        m.progress.setValue(m.progress.maximum())
        m.progress.setFormat("loaded")
        m.summary.setText(info.summary + ("\n" + info.conformance_text.split("\n")[0] if info.conformance_text else ""))
        m.summary.setToolTip(info.conformance_text)
        self.model_loaded = info
        self.loaded_ref = ModelRef(ref.path, ref.dtype, ref.device, ref.trust_remote_code, info.config_hash,
                                   info.conformance)
        self.project.set_model(self.loaded_ref)
        self.layer_panel.set_tree(info.tree, self.project.view("selected_hooks", []))
        self.device_label.setText(f"device: {info.device}")
        self.memory_label.setText(f"weights: {human_bytes(info.memory_bytes)}")
        self.job_label.setText("model loaded")
        self.request_tokens()

    def _model_failed(self, message: str, details: str = ""):
        m = self.model_panel
        m.load_button.setEnabled(True)
        m.progress.setValue(0)
        m.progress.setFormat("not loaded")
        self.job_label.setText("load failed")
        self.show_error(message, details)

    def unload_model(self):
        self.runner.cancel_slot("analysis")
        self._submit(worker_jobs.unload_model(), "model", finished=lambda _v: self._unloaded())

    def _unloaded(self):
        self.model_loaded = self.loaded_ref = None
        self.model_panel.summary.setText("No model loaded.")
        self.model_panel.unload_button.setEnabled(False)
        self.model_panel.progress.setValue(0)
        self.layer_panel.set_tree(None)
        self.prompts_panel.clear_chips()
        self.device_label.setText("no model")
        self.memory_label.setText("")

    def browse_model(self, gguf: bool = False):
        start = self.model_panel.path_edit.text() or str(Path.home())
        if gguf:
            path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", start, "GGUF models (*.gguf)")
        else:
            path = QFileDialog.getExistingDirectory(self, "Open a model folder", start)
        if path:
            self.model_panel.path_edit.setText(path)
            self.load_model()

    # ---- prompts and tokens
    def _prompt_edited(self, field: str, text: str):
        if self._syncing:
            return
        if getattr(self.project.prompts, field) != text:
            self.undo_stack.push(SetPromptField(self.project, field, text))
        self.token_timer.start()

    def _sync_prompts_to_edits(self):
        self._syncing = True
        try:
            for field, edit in self.prompts_panel.edits().items():
                value = getattr(self.project.prompts, field) or ""
                if edit.text() != value:
                    edit.setText(value)
        finally:
            self._syncing = False

    def request_tokens(self):
        if self.model_loaded is None:
            self.prompts_panel.clear_chips("load a model to see the tokens")
            return
        pr = self.project.prompts
        texts = {"clean": pr.clean, "corrupted": pr.corrupted, "answer": pr.answer, "wrong_answer": pr.wrong_answer}
        self._submit(worker_jobs.tokenize(texts, pr.prepend_bos), "tokenize", finished=self._show_tokens)

    def _show_tokens(self, tok: worker_jobs.Tokenized | None):
        p = self.prompts_panel
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

