"""How responsive the window stays while a sweep streams into the heatmap, and how fast it appears.

`measure_ui_stalls(model_dir)` (called by `interp-workbench bench`) runs offscreen: it builds the real main
window, loads the model, runs `resid_pre` activation-patching sweeps in small batches so that cells stream
in, and records the gaps between the ticks of a 5 ms QTimer on the UI thread. A gap is the time the event
loop could not serve the timer: 5 ms when nothing blocks, more when painting or event handling stalls.
`launch_to_window_s` is measured in a fresh process: from starting Python to the shown window's event loop.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np

TICK_MS = 5


def measure_launch(timeout: float = 60.0) -> float:
    """Seconds from starting a new interpreter to the window being shown with its event loop running."""
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "offscreen")
    with tempfile.TemporaryDirectory() as tmp:
        env["INTERP_WORKBENCH_DATA_DIR"] = env["INTERP_WORKBENCH_CONFIG_DIR"] = tmp
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "desktop_app.ui.app", "--launch-probe"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("visible"):
                    elapsed = time.perf_counter() - t0
                    proc.wait(timeout)
                    return elapsed
            raise RuntimeError("the window did not report that it was shown")
        finally:
            if proc.poll() is None:
                proc.kill()


def measure_ui_stalls(model_dir, min_seconds: float = 2.0, batch_size: int = 2, prompts=None,
                      launch: bool = True) -> dict:
    """{max_ms, p99_ms, launch_to_window_s, first_sweep_max_ms, ticks, cells, sweep_s} for streaming resid_pre
    sweeps. The first sweep is measured apart (first_sweep_max_ms): it also builds the plot widgets once."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QEventLoop, Qt, QTimer
    from PySide6.QtWidgets import QApplication

    from desktop_app.demo_task import ioi_examples

    launch_s = measure_launch() if launch else float("nan")
    app = QApplication.instance() or QApplication([sys.argv[0] if sys.argv else "interp-workbench"])
    saved_env = {k: os.environ.get(k) for k in ("INTERP_WORKBENCH_DATA_DIR", "INTERP_WORKBENCH_CONFIG_DIR")}
    tmp = tempfile.TemporaryDirectory()
    os.environ["INTERP_WORKBENCH_DATA_DIR"] = os.environ["INTERP_WORKBENCH_CONFIG_DIR"] = tmp.name
    from desktop_app.ui import create_main_window

    window = create_main_window([])
    window.confirm_dialogs = False
    window.show()
    try:
        _wait(app, lambda: False, 0.2)
        m = window.model_panel
        m.path_edit.setText(str(model_dir))
        m.load_button.click()
        _wait(app, lambda: window.model_loaded is not None or window.message_bar.level == "error", 300)
        if window.model_loaded is None:
            raise RuntimeError(f"the model did not load: {window.message_bar.text()}")
        ex = prompts or ioi_examples(1, seed=0)[0]
        p = window.prompts_panel
        p.clean_edit.setText(ex.clean)
        p.corrupted_edit.setText(ex.corrupted)
        p.answer_edit.setText(ex.answer)
        p.wrong_edit.setText(getattr(ex, "wrong", None) or ex.wrong_answer)
        a = window.analysis_panel
        a.set_kind("activation_patching")
        a.set_field("component", "resid_pre")
        a.set_field("positions", "each")
        a.batch_spin.setValue(batch_size)
        _wait(app, lambda: False, 0.3)  # let the tokeniser job settle

        gaps: list[float] = []
        last = [time.perf_counter()]

        def tick():
            now = time.perf_counter()
            gaps.append(now - last[0])
            last[0] = now
        timer = QTimer()
        timer.setTimerType(Qt.PreciseTimer)
        timer.setInterval(TICK_MS)
        timer.timeout.connect(tick)
        cells, t_start, first_sweep = 0, time.perf_counter(), None
        while time.perf_counter() - t_start < min_seconds or first_sweep is None or len(gaps) < 2:
            loop = QEventLoop()
            outcome: list = []
            job = [None]

            def ended(job_id, *args):
                if job_id == job[0]:
                    outcome.append(args)
                    loop.quit()
            for sig in (window.runner.finished, window.runner.errored, window.runner.cancelled):
                sig.connect(ended)
            last[0] = time.perf_counter()
            timer.start()
            window.run_analysis()
            job[0] = window._run_job
            if job[0] is not None:
                loop.exec()
            timer.stop()
            for sig in (window.runner.finished, window.runner.errored, window.runner.cancelled):
                sig.disconnect(ended)
            if job[0] is None or window.message_bar.level == "error":
                raise RuntimeError(f"the sweep failed: {window.message_bar.text()}")
            result = window.current_result()
            cells += 0 if result is None else result.values.size
            if first_sweep is None:  # the first sweep also pays one-time costs (the plot widgets are built)
                first_sweep = max(gaps, default=0.0) * 1000.0
                gaps.clear()
                t_start = time.perf_counter()
        sweep_s = time.perf_counter() - t_start
        g = np.array(gaps) * 1000.0
        return {"max_ms": float(g.max()), "p99_ms": float(np.percentile(g, 99)), "launch_to_window_s": launch_s,
                "first_sweep_max_ms": first_sweep,
                "ticks": int(g.size), "cells": int(cells), "sweep_s": sweep_s}
    finally:
        window.close()
        window.deleteLater()
        tmp.cleanup()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _wait(app, condition, timeout_s: float):
    end = time.perf_counter() + timeout_s
    while time.perf_counter() < end and not condition():
        app.processEvents()
        time.sleep(0.005)


if __name__ == "__main__":
    print(measure_ui_stalls(sys.argv[1]))
