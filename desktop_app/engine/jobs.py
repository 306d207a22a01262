"""The job protocol: a job is a generator that yields Progress / Partial events and returns its result.

    def my_job(spec, cancel: CancelToken):
        for chunk in ...:
            cancel.check()
            yield Partial(index=..., values=...)
            yield Progress(done, total, "message")
        return result

`drive(job, on_event)` runs one to completion and hands back the return value.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Generator

from desktop_app.engine.errors import JobCancelled, OutOfMemory


@dataclass
class Progress:
    done: int
    total: int
    message: str = ""


@dataclass
class Partial:
    """Finished cells of the result: `index` is a tuple of index arrays into the result's values (numpy
    fancy indexing), `values` the numbers for them (numpy, already on the CPU)."""

    index: tuple
    values: Any


@dataclass
class CancelToken:
    _event: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise JobCancelled()


Job = Generator[Any, None, Any]


def drive(job: Job, on_event: Callable[[Any], None] | None = None) -> Any:
    """Run a job generator to its end, passing each event to `on_event`; returns the job's result."""
    try:
        while True:
            event = next(job)
            if on_event is not None:
                on_event(event)
    except StopIteration as stop:
        return stop.value


def stream_cells(result, cells: Job, started: float):
    """Pass on the events of `cells`, a generator that fills result.values; a cancel or an out-of-memory ends
    it with the finished cells kept (status partial, or failed when none was finished). Sets elapsed_s and
    returns the result: `return (yield from stream_cells(result, cells(), t0))`."""
    done = 0
    try:
        for event in cells:
            if isinstance(event, Progress):
                done = event.done
            yield event
    except JobCancelled:
        result.status = "partial"
        result.message = f"cancelled after {done} of {result.values.size} cells"
    except OutOfMemory as err:
        result.status = "partial" if done else "failed"
        result.message = str(err)
    result.elapsed_s = time.perf_counter() - started
    return result
