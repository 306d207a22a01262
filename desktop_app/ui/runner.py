"""The runner: one long-lived QThread that owns the loaded model and runs engine jobs one at a time.

The UI thread submits a job as a function `fn(state, cancel) -> generator` (or a plain value); the worker
drives it inside `torch.inference_mode()` and emits `progressed / partial / finished / errored / cancelled`
with the job id. A job submitted under a `slot` cancels the earlier job of that slot (running or queued),
so a new run supersedes the old one (Orange3 `ConcurrentMixin.start`). Progress events are throttled to
~30 Hz here; partial results are passed on as they come and the views coalesce their repaints.

Torch is imported inside the worker thread only, so the window can appear before torch is loaded.
"""
from __future__ import annotations

import atexit
import itertools
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

from PySide6.QtCore import QCoreApplication, QObject, QThread, Signal, Slot

from desktop_app.engine.errors import JobCancelled, WorkbenchError
from desktop_app.engine.jobs import CancelToken, Partial, Progress

PROGRESS_INTERVAL_S = 1 / 30


def _leave_a_core_for_the_window(torch) -> None:
    """torch's intra-op threads default to one per core; with every core busy the UI thread waits for the CPU
    and the window stutters. The worker keeps one core free (set once; a user's OMP_NUM_THREADS wins)."""
    import os

    if os.environ.get("OMP_NUM_THREADS") or getattr(_leave_a_core_for_the_window, "done", False):
        return
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
    _leave_a_core_for_the_window.done = True


@dataclass
class WorkerState:
    """What lives in the worker thread between jobs: the loaded model (engine LoadedModel) and its path."""
    lm: Any = None
    extras: dict = field(default_factory=dict)


@dataclass
class _Job:
    job_id: int
    slot: str
    fn: Callable
    cancel: CancelToken


class _Worker(QObject):
    progressed = Signal(int, int, int, str)  # job id, done, total, message
    partial = Signal(int, object, object)  # job id, index (tuple of arrays), values
    finished = Signal(int, object)  # job id, return value
    errored = Signal(int, str, str)  # job id, one-line message, details
    cancelled = Signal(int, object)  # job id, what the job returned after noticing the cancel (or None)
    started = Signal(int)
    noted = Signal(int, object)  # job id, any other event a job yields (e.g. the empty result it will fill)

    def __init__(self):
        super().__init__()
        self.state = WorkerState()
        self._jobs: dict[int, _Job] = {}
        self._lock = threading.Lock()

    def add(self, job: _Job) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    @Slot(int)
    def run_job(self, job_id: int) -> None:
        with self._lock:
            job = self._jobs.pop(job_id, None)
        if job is None:
            return
        if job.cancel.cancelled:
            self.cancelled.emit(job_id, None)
            return
        self.started.emit(job_id)
        try:
            import torch  # the first job pays for importing torch, in this thread

            _leave_a_core_for_the_window(torch)
            with torch.inference_mode():
                value = self._drive(job)
        except JobCancelled:
            self.cancelled.emit(job_id, None)
        except WorkbenchError as err:
            self.errored.emit(job_id, str(err), err.details or "")
        except MemoryError as err:
            self.errored.emit(job_id, "the computer ran out of memory; use a smaller model, dtype or batch.",
                              repr(err))
        except Exception as err:  # noqa: BLE001 - a bug in a job must not take the window down
            text = str(err).splitlines()[0] if str(err) else type(err).__name__
            self.errored.emit(job_id, f"unexpected error: {text}", traceback.format_exc())
        else:
            if job.cancel.cancelled:
                self.cancelled.emit(job_id, value)
            else:
                self.finished.emit(job_id, value)

    def _drive(self, job: _Job):
        out = job.fn(self.state, job.cancel)
        if not hasattr(out, "__next__"):
            return out
        last_progress = 0.0
        pending: Progress | None = None
        try:
            while True:
                event = next(out)
                if isinstance(event, Partial):
                    self.partial.emit(job.job_id, event.index, event.values)
                elif isinstance(event, Progress):
                    now = time.perf_counter()
                    if now - last_progress >= PROGRESS_INTERVAL_S or event.done >= event.total:
                        self.progressed.emit(job.job_id, event.done, event.total, event.message)
                        last_progress, pending = now, None
                    else:
                        pending = event
                else:
                    self.noted.emit(job.job_id, event)
        except StopIteration as stop:
            if pending is not None:
                self.progressed.emit(job.job_id, pending.done, pending.total, pending.message)
            return stop.value


class Runner(QObject):
    """UI-side handle of the worker thread. Signals carry the job id; drop events of jobs you no longer want."""

    progressed = Signal(int, int, int, str)
    partial = Signal(int, object, object)
    finished = Signal(int, object)
    errored = Signal(int, str, str)
    cancelled = Signal(int, object)
    started = Signal(int)
    noted = Signal(int, object)
    busy_changed = Signal(bool)
    _run = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._ids = itertools.count(1)
        self._thread = QThread()
        self._thread.setObjectName("interp-workbench-runner")
        self._worker = _Worker()
        self._worker.moveToThread(self._thread)
        self._run.connect(self._worker.run_job)
        for name in ("progressed", "partial", "finished", "errored", "cancelled", "started", "noted"):
            getattr(self._worker, name).connect(getattr(self, name))
        for sig in (self._worker.finished, self._worker.errored, self._worker.cancelled):
            sig.connect(self._job_done)
        self._active: dict[int, _Job] = {}
        self._slots: dict[str, int] = {}
        self._thread.start()
        # A script that exits without closing the window must still stop the thread (Qt aborts otherwise).
        ref = weakref.ref(self)
        atexit.register(_shutdown_ref, ref)
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.shutdown)

    # ---- submitting and cancelling ----
    def submit(self, fn: Callable, slot: str = "") -> int:
        """Queue `fn(state, cancel)`; returns the job id. A slot's previous job is cancelled first."""
        if slot and slot in self._slots:
            self.cancel(self._slots[slot])
        job = _Job(next(self._ids), slot, fn, CancelToken())
        self._active[job.job_id] = job
        if slot:
            self._slots[slot] = job.job_id
        self._worker.add(job)
        was_busy = self.busy
        self._run.emit(job.job_id)
        if not was_busy:
            self.busy_changed.emit(True)
        return job.job_id

    def cancel(self, job_id: int | None = None) -> None:
        """Cancel one job, or every active job when job_id is None."""
        jobs = list(self._active.values()) if job_id is None else [self._active.get(job_id)]
        for job in jobs:
            if job is not None:
                job.cancel.cancel()

    def cancel_slot(self, slot: str) -> None:
        if slot in self._slots:
            self.cancel(self._slots[slot])

    def current(self, slot: str) -> int | None:
        return self._slots.get(slot)

    def is_active(self, job_id: int) -> bool:
        return job_id in self._active

    @property
    def busy(self) -> bool:
        return bool(self._active)

    @Slot(int)
    def _job_done(self, job_id: int, *_):
        job = self._active.pop(job_id, None)
        if job is not None and self._slots.get(job.slot) == job_id:
            del self._slots[job.slot]
        if not self._active:
            self.busy_changed.emit(False)

    # ---- shutting down ----
    def shutdown(self, timeout_ms: int = 10_000) -> bool:
        """Cancel every job, stop the thread and join it; True if it stopped in time."""
        if not self._thread.isRunning():
            return True
        self.cancel()
        self._thread.quit()
        ok = self._thread.wait(timeout_ms)
        return bool(ok)

    @property
    def thread(self) -> QThread:
        return self._thread


def _shutdown_ref(ref):
    runner = ref()
    if runner is not None:
        try:
            runner.shutdown()
        except RuntimeError:  # the C++ side is already gone
            pass
