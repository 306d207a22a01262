"""Live curves of every training kind (sae_training, transcoder_training), however the run was started: the SAE
menu's Train SAE… / Train transcoders…, the Analysis panel's Run, Run all or a re-run from the Analyses list.

AnalysisController starts every analysis; for a training kind it hands the run's start, its curve events
(TrainMetrics, per layer for transcoders), its end and a Stop to LiveTraining, which fills the training dock
and says where the trained weights (or, after a Stop, those trained so far) are saved.
"""
from __future__ import annotations

from typing import Callable

from PySide6.QtCore import Qt, QTimer

DOCK_HEIGHT = 340  # the curves need about this much room when the dock first opens


def _is_curve_point(event) -> bool:
    # TrainMetrics (SAE) or LayerTrainMetrics (one transcoder layer); duck-typed so the UI never imports torch
    return hasattr(event, "explained_variance") and hasattr(event, "step")


def _start_text(spec) -> str:
    if spec.kind == "transcoder_training":
        where = f"layers {', '.join(map(str, spec.layers))}" if spec.layers else "every layer"
        return f"training {spec.architecture} transcoders ({spec.width} features, {where})…"
    return f"training a {spec.architecture} SAE with {spec.width} features at {spec.hook}…"


TITLES = {"sae_training": "SAE training", "transcoder_training": "Transcoder training"}
WHAT = {"sae_training": "the SAE", "transcoder_training": "the transcoder set"}
SO_FAR = {"sae_training": "the SAE trained so far is", "transcoder_training": "the transcoders trained so far are"}
BUSY = {"sae_training": "training an SAE", "transcoder_training": "training transcoders"}


class LiveTraining:
    """Dependencies: the training view and its dock, `resize_docks` (the window's resizeDocks), `messages`
    (show_message), the job label. `done_actions[kind](result)` may give (button text, callback) for the
    message that says a run of that kind is done (the SAE's Attach it)."""

    KINDS = tuple(TITLES)

    def __init__(self, view, dock, resize_docks, messages, job_label):
        self.view, self.dock, self.resize_docks, self.messages, self.job_label = (
            view, dock, resize_docks, messages, job_label)
        self.done_actions: dict[str, Callable] = {}
        self.kind: str | None = None  # the kind of the run being shown, None when no training runs

    def handles(self, kind: str) -> bool:
        return kind in TITLES

    def started(self, spec) -> bool:
        """A run of `spec` starts: for a training kind, clear and show the curves (True); else False."""
        if not self.handles(spec.kind):
            self.kind = None
            return False
        self.kind = spec.kind
        self.view.start(_start_text(spec))
        self.dock.setWindowTitle(TITLES[spec.kind])
        if not self.dock.isVisible():
            self.dock.show()
            # after the dock is laid out, or Qt ignores the size
            QTimer.singleShot(0, lambda: self.resize_docks([self.dock], [DOCK_HEIGHT], Qt.Vertical))
        self.dock.raise_()
        self.job_label.setText(BUSY[spec.kind])
        return True

    def note(self, event) -> None:
        if self.kind is not None and _is_curve_point(event):
            self.view.add_metrics(event)

    def finished(self, result) -> None:
        kind, self.kind = self.kind, None
        if kind is None:
            return
        if result is None or result.status == "failed":
            self.view.finish("training failed; see the message bar.")
            return
        if result.status == "partial":  # the job noticed a Stop and returned what it had
            self._stopped(kind, result)
            return
        folder = str(result.params.get("out_folder", ""))
        text = f"trained {result.params.get('steps_done')} steps; {WHAT[kind]} is saved in {folder}"
        self.view.finish(text)
        self.job_label.setText("training done")
        action = self.done_actions.get(kind)
        label, callback = action(result) if action is not None else ("", None)
        self.messages.show_message(text + ".", "info", label, callback)

    def cancelled(self, result) -> None:
        """Stopped: `result` is what the job returned after noticing the Stop (None: stopped before it trained)."""
        kind, self.kind = self.kind, None
        if kind is not None:
            self._stopped(kind, result)

    def _stopped(self, kind: str, result) -> None:
        steps = int(result.params.get("steps_done", 0) or 0) if result is not None else 0
        folder = str(result.params.get("out_folder", "")) if result is not None else ""
        if steps > 0 and folder:
            text = f"cancelled after {steps} steps; {SO_FAR[kind]} saved in {folder}"
            checkpoint = str(result.params.get("checkpoint", "") or "")
            if checkpoint and checkpoint != folder:  # the SAE's full training state, which Resume continues from
                text += f" (training state in {checkpoint})"
            self.messages.show_message(text + ".", "warning")
        else:
            text = "training was cancelled before the first step; nothing was saved"
            self.messages.show_message(text + ".", "warning")
        self.view.finish(text + ".")
        self.job_label.setText("training stopped")

    def failed(self) -> None:
        if self.kind is not None:
            self.kind = None
            self.view.finish("training failed; see the message bar.")


def live_training_of(run_spec, view, dock, resize_docks, messages, job_label) -> LiveTraining | None:
    """The LiveTraining of the AnalysisController whose `run_spec` a training pane was given, made on first use
    (the SAE pane and the transcoder trainer share one); None without a controller."""
    controller = getattr(run_spec, "__self__", None)
    if controller is None or not hasattr(controller, "set_training"):
        return None
    if controller.training is None:
        controller.set_training(LiveTraining(view, dock, resize_docks, messages, job_label))
    return controller.training
