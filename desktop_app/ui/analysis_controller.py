"""Running analyses: the Analysis panel's run / cancel, Run all, streaming cells into the result view, the
selected analysis shown (stale or not), and the next-token predictions of a clicked cell.

AnalysisController is a small Qt-side controller with explicit dependencies over the Qt-free session; JobRouter
routes the runner's events of each job to the handlers given when it was submitted.
"""
from __future__ import annotations

import dataclasses
import html
import time
from typing import Callable

import numpy as np

from PySide6.QtCore import Qt, QTimer

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.project.undo import AddAnalysis, ReplaceSpec
from desktop_app.ui import worker_jobs
from desktop_app.ui.panels import HOOK_COMPONENT


class JobRouter:
    """submit(fn, slot, progress=..., partial=..., note=..., finished=..., errored=..., cancelled=...): the
    runner's events of that job go to those handlers; events of jobs nobody waits for are dropped."""

    def __init__(self, runner, on_idle: Callable[[], None]):
        self.runner = runner
        self._handlers: dict[int, dict] = {}
        r = runner
        r.progressed.connect(lambda j, d, t, m: self._dispatch(j, "progress", d, t, m))
        r.partial.connect(lambda j, i, v: self._dispatch(j, "partial", i, v))
        r.noted.connect(lambda j, e: self._dispatch(j, "note", e))
        r.finished.connect(lambda j, v: self._dispatch(j, "finished", v, final=True))
        r.errored.connect(lambda j, m, d: self._dispatch(j, "errored", m, d, final=True))
        r.cancelled.connect(lambda j, v: self._dispatch(j, "cancelled", v, final=True))
        r.busy_changed.connect(lambda busy: None if busy else on_idle())

    def submit(self, fn, slot: str, **handlers) -> int:
        job_id = self.runner.submit(fn, slot)
        self._handlers[job_id] = handlers
        return job_id

    def _dispatch(self, job_id, event, *args, final=False):
        handlers = self._handlers.pop(job_id, None) if final else self._handlers.get(job_id)
        if handlers and event in handlers:
            handlers[event](*args)


class AnalysisController:
    """Dependencies: the session; the runner and `submit` (JobRouter); `model()` (the loaded model or None);
    the Analysis panel, the result view and the predictions label; `messages` (show_error, show_message,
    clear); the job label; `status(text, ms)` (the status bar); the SAE pane and `show_sae_dock()`;
    `ended(state)` (the window's analysis_ended signal); `show_detail(result, record)` (the detail dock's views
    keyed by view type: lens grid, attention patterns, token strips)."""

    def __init__(self, session, runner, submit, model, analysis_panel, result_view, predictions_label, messages,
                 job_label, status, sae_view, show_sae_dock, ended, show_detail=lambda result, record: None):
        self.session, self.runner, self.submit, self.model = session, runner, submit, model
        self.analysis_panel, self.result_view, self.predictions_label = analysis_panel, result_view, predictions_label
        self.messages, self.job_label, self.status = messages, job_label, status
        self.sae_view, self.show_sae_dock, self.ended = sae_view, show_sae_dock, ended
        self.show_detail = show_detail
        self.run_job: int | None = None
        self.run_name = ""
        self.run_t0 = 0.0
        self.run_queue: list[str] = []
        self.streaming: AnalysisResult | None = None
        self._also_finished = self._also_note = self._also_ended = None  # a run_spec caller's own handlers
        self.predictions: worker_jobs.Predictions | None = None
        self.training = None  # training_live.LiveTraining: live curves of the training kinds (set_training)
        analysis_panel.run_button.clicked.connect(self.run_analysis)
        analysis_panel.cancel_button.clicked.connect(self.cancel_analysis)
        result_view.cell_clicked.connect(self.cell_clicked)

    @property
    def project(self):
        return self.session.project

    def set_training(self, live):
        """Every run of a training kind (sae_training, transcoder_training), from any path, shows its curves live
        through `live` (a training_live.LiveTraining) and says where a Stop saved the weights so far."""
        self.training = live

    def _training_run(self) -> bool:
        return self.training is not None and self.training.kind is not None

    # ---- analysis
    def spec_from_panel(self):
        """The spec the Analysis panel shows (SpecError with one sentence when a field is not valid)."""
        a = self.analysis_panel
        record = a.record()
        values = a.values()
        return record.spec(name=record.new_name(values), **values)

    def _named_like_project(self, spec):
        """The panel's spec under the name of the project's analysis with the same settings, if there is one
        (so Run on an opened project or the demo recomputes that analysis instead of adding a copy)."""
        for entry in self.project.analyses:
            if entry.spec.kind == spec.kind and dataclasses.replace(spec, name=entry.spec.name) == entry.spec:
                return entry.spec
        return spec

    def run_analysis(self):
        """Run what the Analysis panel shows: the project's analysis with the same settings, or a new one
        (an undoable add, or an undoable spec edit of the analysis of that name)."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; choose a model folder and click Load.")
            return
        try:
            spec = self._named_like_project(self.spec_from_panel())
        except Exception as err:  # noqa: BLE001 - SpecError: one sentence for the message bar
            self.messages.show_error(str(err))
            return
        if spec.name in self.project.names():
            if self.project.entry(spec.name).spec != spec:
                self.session.push(ReplaceSpec(self.project, spec.name, spec))
        else:
            self.session.push(AddAnalysis(self.project, spec))
        self._start_run(spec)

    def run_spec(self, spec, finished=None, note=None, ended=None) -> int | None:
        """Add `spec` to the project (an undoable add, or an undoable spec edit of the analysis of that name) and
        run it through the registry, as the Analysis panel's Run does; other panes (the SAE pane) create their
        analyses with this. finished(result) / note(event) / ended(state: done, cancelled, failed) are called
        besides the usual handling."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; choose a model folder and click Load.")
            return None
        if self.run_job is not None:
            self.messages.show_message(f"{self.session.running} is running; wait for it or cancel it first.", "warning")
            return None
        if spec.name in self.project.names():
            if self.project.entry(spec.name).spec != spec:
                self.session.push(ReplaceSpec(self.project, spec.name, spec))
        else:
            self.session.push(AddAnalysis(self.project, spec))
        self.analysis_panel.show_spec(spec)
        return self._start_run(spec, finished, note, ended)

    def run_named(self, name: str):
        """Run the project's analysis `name` as its spec says (the list's Run, Re-run of a stale result)."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; choose a model folder and click Load.")
            return
        if self.run_job is not None:
            self.messages.show_message(f"{self.session.running} is running; wait for it or cancel it first.", "warning")
            return
        entry = self.project.entry(name)
        self.analysis_panel.show_spec(entry.spec)
        self._start_run(entry.spec)

    def run_all(self):
        """Run every analysis without a result, or with a stale or unfinished one, in order."""
        if self.model() is None:
            self.messages.show_error("no model is loaded; choose a model folder and click Load.")
            return
        self.run_queue = self.session.to_run()
        if not self.run_queue:
            self.messages.show_message("every analysis is up to date with the loaded model.")
            return
        self._run_next_queued()

    def _run_next_queued(self):
        while self.run_queue:
            name = self.run_queue.pop(0)
            if name in self.project.names():
                self.run_named(name)
                return

    def _start_run(self, spec, finished=None, note=None, ended=None):
        self._also_finished, self._also_note, self._also_ended = finished, note, ended
        self.messages.clear()
        a = self.analysis_panel
        self.run_name, self.run_t0, self.streaming = spec.name, time.perf_counter(), None
        self.session.set_running(spec.name)
        self.session.select(spec.name)
        a.set_running(True)
        a.progress.setRange(0, 1)
        a.progress.setValue(0)
        a.rate_label.setText("starting…")
        self.job_label.setText(f"running {spec.name}")
        if self.training is not None:
            self.training.started(spec)
        job = worker_jobs.run_analysis(self.project.prompts, spec, a.batch_spin.value() or None)
        self.run_job = self.submit(job, "analysis", progress=self._run_progress, partial=self._run_partial,
                                     note=self._run_note, finished=self._run_finished, errored=self._run_errored,
                                     cancelled=self._run_cancelled)
        return self.run_job

    def keep_partial_run(self):
        """Store the cells the running analysis has finished (status partial) and stop it (closing the window)."""
        if self.run_job is None:
            return
        kept = self.streaming
        self.run_queue = []
        self.runner.cancel(self.run_job)
        if kept is not None and np.isfinite(kept.values).any():
            kept.status = "partial"
            kept.message = "the window was closed while it ran; the finished cells are kept"
            self._store_result(kept)

    def cancel_analysis(self):
        if self.run_job is not None:
            self.runner.cancel(self.run_job)
            self.job_label.setText("cancelling")

    def _run_note(self, event):
        if self._also_note is not None:
            self._also_note(event)
        if self._training_run():
            self.training.note(event)
        if isinstance(event, worker_jobs.Skeleton):
            self.streaming = event.result
            self._show_result(event.result)

    def _run_partial(self, index, values):
        if self.streaming is not None and self.result_view.result is self.streaming:
            self.result_view.update_cells(index, values)

    def _run_progress(self, done, total, message):
        a = self.analysis_panel
        a.progress.setRange(0, max(total, 1))
        a.progress.setValue(done)
        elapsed = time.perf_counter() - self.run_t0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            left = (total - done) / rate if rate > 0 else 0.0
            a.rate_label.setText(f"{done}/{total} · {rate:.3g}/s · {left:.0f} s left · {message}")
        else:
            a.rate_label.setText(message)

    def _run_ended(self, state: str):
        also, self._also_ended = self._also_ended, None
        if also is not None:
            also(state)
        self.run_job = None
        self.session.set_running(None)
        self.analysis_panel.set_running(False)
        self.job_label.setText(state)
        QTimer.singleShot(0, lambda: self.ended(state))  # after the handler stored the result
        if state == "done" and self.run_queue:
            QTimer.singleShot(0, self._run_next_queued)
        elif state != "done":
            self.run_queue = []

    def _run_finished(self, result: AnalysisResult):
        self._run_ended("done")
        self._store_result(result)
        also, self._also_finished = self._also_finished, None
        if also is not None:
            also(result)
        a = self.analysis_panel
        a.progress.setValue(a.progress.maximum())
        a.rate_label.setText(f"done in {result.elapsed_s:.2f} s ({result.values.size} values)")
        if result.status == "failed":
            self.messages.show_error(result.message or "the analysis failed.")
        elif result.message:
            self.messages.show_message(result.message, "warning")
        if self._training_run():
            self.training.finished(result)

    def _run_cancelled(self, result):
        self._run_ended("cancelled")
        result = result if isinstance(result, AnalysisResult) else self.streaming
        if result is not None:
            if result.status == "complete":
                result.status = "partial"
            self._store_result(result)
        if self._training_run():  # the curves so far are the result; the message says where the weights are
            self.training.cancelled(result)
        elif result is not None:
            n = int((result.values == result.values).sum())
            self.messages.show_message(f"cancelled: {n} of {result.values.size} cells were computed and are kept.",
                              "warning")
        else:
            self.messages.show_message("cancelled before any cell was computed.", "warning")

    def _run_errored(self, message, details):
        self._run_ended("failed")
        if self._training_run():
            self.training.failed()
        kept = self.streaming
        if kept is not None and (kept.values == kept.values).any():
            self._store_result(kept)
            message += " The finished cells are kept."
        self.messages.show_error(message, details)

    def _store_result(self, result: AnalysisResult):
        name = self.run_name if self.run_name in self.project.names() else result.name
        if name not in self.project.names():
            return
        self.project.set_result(name, result, model=self.session.loaded)
        self.streaming = None
        self.session.select(name)
        self._show_selected()

    def patch_here(self, hook: str, kind: str):
        a = self.analysis_panel
        a.set_kind("activation_patching")
        a.set_field("component", HOOK_COMPONENT[kind])
        self.run_analysis()

    def open_tree_item(self, item, _column=0):
        """A double-clicked attention pattern hook point in the layer tree opens that layer's patterns."""
        data = item.data(0, Qt.UserRole) if item is not None else None
        if not data or data[1] != "attn.hook_pattern" or kinds.find("attention_patterns") is None:
            return
        a = self.analysis_panel
        a.set_kind("attention_patterns")
        a.set_field("layers", (int(data[0].split(".")[1]),))
        a.set_field("heads", None)
        self.run_analysis()

    # ---- a clicked cell: top next tokens of the clean, corrupted and patched runs
    def cell_clicked(self, cell, value=None):
        view = self.result_view
        result = view.result
        if result is None:
            return
        self.status(view.describe(cell), 8000)
        record = kinds.find(result.kind)
        if record is not None and record.click == "details" and record.details is not None:
            text = record.details(result, view.cell_coordinates(cell))  # from the stored result: no model needed
            self.predictions_label.setText(f"<b>{html.escape(view.describe(cell))}</b>"
                                           f"<pre>{html.escape(text)}</pre>")
            return
        if self.model() is None:
            self.predictions_label.setText("Load the model to see the predictions of a cell.")
            return
        name = self.session.selected
        if result is not self.streaming and (name is None or not self.session.computed_with_loaded(name)):
            # never run the loaded model on another model's token ids: offer a re-run instead
            reason = self.session.stale_reason(name) if name else "it is not part of the project"
            self.predictions_label.setText(f"<b>{html.escape(view.describe(cell))}</b><br>This result was "
                                           f"{html.escape(reason or 'computed with another model')}; nothing is "
                                           f"computed for its cells. Re-run it to see predictions.")
            if name:
                self.messages.show_message(f"{name} was {reason or 'computed with another model'}; re-run it with the "
                                  f"loaded model to see the predictions of a cell.", "warning", "Re-run",
                                  lambda n=name: self.run_named(n))
            return
        record = kinds.find(result.kind)
        click = record.click if record is not None else "describe"
        if click == "select_token":
            coords = view.cell_coordinates(cell)
            if "position" in coords:
                self.sae_view.select_token(coords["position"])
            return
        if click == "describe":
            self.predictions_label.setText(f"<b>{html.escape(view.describe(cell))}</b>")
            return
        where = view.describe(cell)
        over_pairs = result.tokens_clean is not None and np.ndim(result.tokens_clean) == 2
        pair = view.pair_index() if over_pairs else None
        if over_pairs and pair is None:
            self.predictions = None
            self.predictions_label.setText(f"<b>{html.escape(where)}</b><br>The mean over pairs has no predictions "
                                           f"of its own; pick a pair in the pair selector to see its top-5 "
                                           f"predictions.")
            return
        patch = self.cell_patch(result, view.cell_coordinates(cell))
        ids = {what: pair_tokens(arr, pair or 0) for what, arr in (("clean", result.tokens_clean),
                                                                  ("corrupted", result.tokens_corrupted))
               if arr is not None}
        if over_pairs:
            where = f"{where} — pair {pair}{self._pair_answers(pair, name)}"
        self.predictions_label.setText(f"<b>{html.escape(where)}</b><br>computing…")
        job = worker_jobs.top_predictions(self.project.prompts, 5, patch, ids)
        self.submit(job, "predictions", finished=lambda p: self._show_predictions(p, where),
                     errored=lambda m, d: self.predictions_label.setText(html.escape(m)))

    def _pair_answers(self, pair: int, name: str | None) -> str:
        """', answer X, wrong Y' of a pair from the project's pairs, when the result still belongs to them."""
        pairs = getattr(self.project.prompts, "pairs", None)
        if not pairs or pair >= len(pairs) or not name or self.session.stale_reason(name):
            return ""
        p = pairs[pair]
        text = f": answer {'/'.join(repr(a) for a in p.answers())}"
        if p.wrongs():
            text += f", wrong {'/'.join(repr(w) for w in p.wrongs())}"
        return text

    @staticmethod
    def cell_patch(result: AnalysisResult, coords: dict) -> worker_jobs.CellPatch | None:
        """The activation patch a cell of a patching result stands for (None for other kinds)."""
        params = result.params or {}
        component = params.get("component")
        record = kinds.find(result.kind)
        if record is None or record.click != "patched_predictions" or not component or "layer" not in coords:
            return None
        if params.get("positions") == "named":  # a role's token position differs from pair to pair
            return None
        labels = result.labels.get("layer") or []
        row = coords["layer"]
        layer = int(labels[row]) if row < len(labels) and str(labels[row]).isdigit() else row
        return worker_jobs.CellPatch(component=component, layer=layer, position=coords.get("position"),
                                     head=coords.get("head") if component == "head_out" else None,
                                     direction=params.get("direction", "denoise"))

    def _show_predictions(self, pred: worker_jobs.Predictions, where: str):
        parts = [f"<b>{html.escape(where)}</b>"]
        if pred.title:
            parts.append(f"<i>{html.escape(pred.title)}</i>")
        for what in ("clean", "corrupted", "patched"):
            rows = pred.rows.get(what)
            if rows is None:
                continue
            cells = "".join(f"<tr><td>{html.escape(t)}</td><td align=right>{p:.3f}</td></tr>" for t, p in rows)
            parts.append(f"<b>{what}</b><table cellspacing=2>{cells}</table>")
        if "patched" not in pred.rows:
            parts.append("<i>Patched predictions are shown for activation and attribution patching results.</i>")
        self.predictions_label.setText("<br>".join(parts))
        self.predictions = pred

    # ---- the shown result: the session's selected analysis
    def _show_selected(self):
        name = self.session.selected
        if name is None or name not in self.project.names():
            return
        entry = self.project.entry(name)
        if self.run_job is None:
            self.analysis_panel.show_spec(entry.spec)  # the panel shows what the selected analysis runs
        if entry.result is None:
            if self.streaming is None or self.run_name != name:
                self.result_view.set_result(None)
            return
        self._show_result(entry.result, self.session.stale_reason(name))

    def shared_extent(self, result: AnalysisResult) -> float | None:
        """With View > Shared colour scale: the largest |value| over the project's results of the same value
        name and scale (so equal colours mean equal numbers across them); else None."""
        if not self.project.view("shared_colour_scale", False) or result is None:
            return None
        name, scale = kinds.value_label(result), kinds.scale_of(result)
        extent = 0.0
        for entry in self.project.analyses:
            r = entry.result
            if r is not None and r.values.size and kinds.value_label(r) == name and kinds.scale_of(r) == scale:
                finite = np.asarray(r.values, dtype=np.float64)
                finite = finite[np.isfinite(finite)]
                if finite.size:
                    extent = max(extent, float(np.abs(finite).max()))
        return extent or None

    def set_shared_colour_scale(self, on: bool):
        from desktop_app.project.undo import SetViewValue

        if bool(self.project.view("shared_colour_scale", False)) != bool(on):
            self.session.push(SetViewValue(self.project, "shared_colour_scale", True if on else None,
                                              "Shared colour scale"))

    def _show_result(self, result: AnalysisResult, stale: str = ""):
        if result is not self.result_view.result:
            record = kinds.find(result.kind) if result is not None else None
            self.predictions_label.setText(CLICK_HINTS.get(record.click if record else "describe",
                                                           CLICK_HINTS["describe"]))
        self.result_view.shared_extent = self.shared_extent(result)
        self.result_view.set_result(result, stale=stale)
        record = kinds.find(result.kind) if result is not None else None
        self.show_detail(result, record)  # views keyed by view type (lens grid, patterns, strips)
        if record is not None and record.view == "feature_table" and result.values.size:
            self.show_sae_dock()
            self.sae_view.show_result(result)

    def current_result(self) -> AnalysisResult | None:
        return self.result_view.result



CLICK_HINTS = {  # what the pane beside the result says before a cell is clicked, by the kind's `click`
    "patched_predictions": "Click a heatmap cell to see the top next tokens of the clean, corrupted and patched runs.",
    "predictions": "Click a cell to see the top next tokens of the clean and corrupted runs.",
    "details": "Click a cell to see its details.",
    "select_token": "Click a token to see its features.",
    "describe": "Click a cell or bar to see its value.",
}


def pair_tokens(tokens, pair: int = 0) -> list[int]:
    """Token ids of one prompt; over a dataset ([pair, position], -1 padded) those of pair `pair`, padding
    removed."""
    arr = np.asarray(tokens)
    if arr.ndim == 2:
        if not 0 <= pair < len(arr):
            raise IndexError(f"pair {pair} is not in a result of {len(arr)} pairs")
        arr = arr[pair][arr[pair] >= 0]
    return arr.tolist()


def _first_pair(tokens) -> list[int]:
    """Token ids of the first pair (the pair the prompt fields show)."""
    return pair_tokens(tokens, 0)
