"""Running analyses from the main window: the runner plumbing (job id -> handlers), the Analysis panel's run /
cancel, streaming cells into the heatmap, results as tabs, and the next-token predictions of a clicked cell.

A mixin of MainWindow (like file_ops.FileOpsMixin), so main_window.py stays about building the window.
"""
from __future__ import annotations

import dataclasses
import html
import time

from PySide6.QtCore import Qt, QTimer

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.ui import kind_views, worker_jobs
from desktop_app.ui.panels import HOOK_COMPONENT


class AnalysisMixin:
    # ---- runner plumbing
    def _connect_runner(self):
        r = self.runner
        r.progressed.connect(lambda j, d, t, m: self._dispatch(j, "progress", d, t, m))
        r.partial.connect(lambda j, i, v: self._dispatch(j, "partial", i, v))
        r.noted.connect(lambda j, e: self._dispatch(j, "note", e))
        r.finished.connect(lambda j, v: self._dispatch(j, "finished", v, final=True))
        r.errored.connect(lambda j, m, d: self._dispatch(j, "errored", m, d, final=True))
        r.cancelled.connect(lambda j, v: self._dispatch(j, "cancelled", v, final=True))
        r.busy_changed.connect(self._busy_changed)

    def _submit(self, fn, slot: str, **handlers) -> int:
        job_id = self.runner.submit(fn, slot)
        self._handlers[job_id] = handlers
        return job_id

    def _dispatch(self, job_id, event, *args, final=False):
        handlers = self._handlers.pop(job_id, None) if final else self._handlers.get(job_id)
        if handlers and event in handlers:
            handlers[event](*args)

    def _busy_changed(self, busy: bool):
        if not busy:
            self.job_label.setText("idle")

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
        if self.model_loaded is None:
            self.show_error("no model is loaded; choose a model folder and click Load.")
            return
        try:
            spec = self._named_like_project(self.spec_from_panel())
        except Exception as err:  # noqa: BLE001 - SpecError: one sentence for the message bar
            self.show_error(str(err))
            return
        if spec.name in self.project.names():
            self.project.replace_spec(spec.name, spec)
        else:
            self.project.add_analysis(spec)
        self.message_bar.clear()
        a = self.analysis_panel
        self._run_name, self._run_t0, self._streaming = spec.name, time.perf_counter(), None
        a.set_running(True)
        a.progress.setRange(0, 1)
        a.progress.setValue(0)
        a.rate_label.setText("starting…")
        self.job_label.setText(f"running {spec.name}")
        job = worker_jobs.run_analysis(self.project.prompts, spec, a.batch_spin.value() or None)
        self._run_job = self._submit(job, "analysis", progress=self._run_progress, partial=self._run_partial,
                                     note=self._run_note, finished=self._run_finished, errored=self._run_errored,
                                     cancelled=self._run_cancelled)

    def cancel_analysis(self):
        if self._run_job is not None:
            self.runner.cancel(self._run_job)
            self.job_label.setText("cancelling")

    def _run_note(self, event):
        if isinstance(event, worker_jobs.Skeleton):
            self._streaming = event.result
            self._show_result(event.result)

    def _run_partial(self, index, values):
        if self._streaming is not None and self.result_view.result is self._streaming:
            self.result_view.update_cells(index, values)

    def _run_progress(self, done, total, message):
        a = self.analysis_panel
        a.progress.setRange(0, max(total, 1))
        a.progress.setValue(done)
        elapsed = time.perf_counter() - self._run_t0
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            left = (total - done) / rate if rate > 0 else 0.0
            a.rate_label.setText(f"{done}/{total} cells · {rate:.0f} cells/s · {left:.0f} s left · {message}")
        else:
            a.rate_label.setText(message)

    def _run_ended(self, state: str):
        self._run_job = None
        self.analysis_panel.set_running(False)
        self.job_label.setText(state)
        QTimer.singleShot(0, lambda: self.analysis_ended.emit(state))  # after the handler stored the result

    def _run_finished(self, result: AnalysisResult):
        self._run_ended("done")
        self._store_result(result)
        a = self.analysis_panel
        a.progress.setValue(a.progress.maximum())
        a.rate_label.setText(f"{result.values.size} cells in {result.elapsed_s:.2f} s")
        if result.status == "failed":
            self.show_error(result.message or "the analysis failed.")
        elif result.message:
            self.show_message(result.message, "warning")

    def _run_cancelled(self, result):
        self._run_ended("cancelled")
        result = result if isinstance(result, AnalysisResult) else self._streaming
        if result is not None:
            if result.status == "complete":
                result.status = "partial"
            self._store_result(result)
            n = int((result.values == result.values).sum())
            self.show_message(f"cancelled: {n} of {result.values.size} cells were computed and are kept.",
                              "warning")
        else:
            self.show_message("cancelled before any cell was computed.", "warning")

    def _run_errored(self, message, details):
        self._run_ended("failed")
        kept = self._streaming
        if kept is not None and (kept.values == kept.values).any():
            self._store_result(kept)
            message += " The finished cells are kept."
        self.show_error(message, details)

    def _store_result(self, result: AnalysisResult):
        name = self._run_name if self._run_name in self.project.names() else result.name
        if name not in self.project.names():
            return
        self.project.set_result(name, result)
        self._streaming = None
        self._refresh_tabs(select=name)
        self._show_result(result)

    def _patch_here(self, hook: str, kind: str):
        a = self.analysis_panel
        a.set_kind("activation_patching")
        a.set_field("component", HOOK_COMPONENT[kind])
        self.run_analysis()

    def _tree_item_opened(self, item, _column=0):
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
    def _cell_clicked(self, cell, value=None):
        view = self.result_view
        result = view.result
        if result is None:
            return
        self.statusBar().showMessage(view.describe(cell), 8000)
        record = kinds.find(result.kind)
        if record is not None and record.click == "details" and record.details is not None:
            text = record.details(result, view.cell_coordinates(cell))  # from the stored result: no model needed
            self.predictions_label.setText(f"<b>{html.escape(view.describe(cell))}</b>"
                                           f"<pre>{html.escape(text)}</pre>")
            return
        if self.model_loaded is None:
            self.predictions_label.setText("Load the model to see the predictions of a cell.")
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
        patch = self.cell_patch(result, view.cell_coordinates(cell))
        ids = {what: arr.tolist() for what, arr in (("clean", result.tokens_clean),
                                                     ("corrupted", result.tokens_corrupted)) if arr is not None}
        self.predictions_label.setText(f"<b>{html.escape(view.describe(cell))}</b><br>computing…")
        job = worker_jobs.top_predictions(self.project.prompts, 5, patch, ids)
        where = view.describe(cell)
        self._submit(job, "predictions", finished=lambda p: self._show_predictions(p, where),
                     errored=lambda m, d: self.predictions_label.setText(html.escape(m)))

    @staticmethod
    def cell_patch(result: AnalysisResult, coords: dict) -> worker_jobs.CellPatch | None:
        """The activation patch a cell of a patching result stands for (None for other kinds)."""
        params = result.params or {}
        component = params.get("component")
        record = kinds.find(result.kind)
        if record is None or record.click != "patched_predictions" or not component or "layer" not in coords:
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

    # ---- results as tabs
    def _refresh_tabs(self, select: str | None = None):
        names = [e.name for e in self.project.analyses if e.result is not None]
        tabs = self.result_tabs
        tabs.blockSignals(True)
        while tabs.count():
            tabs.removeTab(0)
        for n in names:
            tabs.addTab(n)
        if select in names:
            tabs.setCurrentIndex(names.index(select))
        tabs.blockSignals(False)
        tabs.setVisible(bool(names))

    def _tab_changed(self, index: int):
        name = self.result_tabs.tabText(index) if index >= 0 else None
        if name and name in self.project.names():
            self._show_result(self.project.entry(name).result)

    def _show_result(self, result: AnalysisResult):
        self.result_view.set_result(result)
        record = kinds.find(result.kind) if result is not None else None
        kind_views.show_detail(self, result, record)  # views keyed by view type (lens grid, patterns, strips)
        if record is not None and record.view == "feature_table" and result.values.size:
            dock = self.docks["saeDock"]
            if not dock.isVisible():
                dock.show()
                # the feature heatmap needs the room (after the dock is laid out, or Qt ignores it)
                QTimer.singleShot(0, lambda: self.resizeDocks([dock], [400], Qt.Horizontal))
            self.sae_view.show_result(result)

    def current_result(self) -> AnalysisResult | None:
        return self.result_view.result

