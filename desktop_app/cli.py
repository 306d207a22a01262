"""The command line: `interp-workbench [PROJECT.iwb | --demo]`, `run`, `export`, `info`, `bench`.

Exit codes (contract section 1): 0 success; 2 bad input, with one `error: ...` line on stderr and no
traceback; 1 an internal error (a bug, one line; IWB_DEBUG=1 shows the traceback); 130 interrupted by
Ctrl-C, after saving what was finished. Torch is imported only by the commands that compute; the window is
imported only to open it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

from desktop_app import cli_safety
from desktop_app.engine.errors import WorkbenchError

COMMANDS = ("run", "export", "info", "bench")
FIGURE_FORMATS = ("png", "svg", "pdf")
DATA_FORMATS = ("csv", "npz")
EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
PROG = "interp-workbench"


class CliError(WorkbenchError):
    """Bad command-line input."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage plus a line; the contract wants one line only
        raise CliError(f"{message}; see '{self.prog} --help'.")


def _error(message: str) -> None:
    cli_safety.write_err("error: " + cli_safety.clean_line(message))


# ---- progress on stderr ------------------------------------------------------------------------------------

def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressReport:
    """Turns job events into a progress bar (a terminal) or into plain lines (a pipe or a log file)."""

    BAR_CELLS = 24

    def __init__(self, stream=None, tty: bool | None = None, quiet: bool = False):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.quiet = quiet
        self.interval = 0.1 if self.tty else 0.5
        self._step = None
        self._last_draw = float("-inf")  # the first progress line of a step always shows
        self._last_done = -1
        self._start = None  # (time, done) of the first progress of this step, for the rate
        self._drawn = False
        self._reading = False  # progress before the first step: reading a dataset file (bytes, not cells)

    def __call__(self, event) -> None:
        from desktop_app.engine.jobs import Progress
        from desktop_app.project.execute import StepFinished, StepStarted

        if self.quiet:
            return
        if isinstance(event, StepStarted):
            self._step = event
            self._start, self._last_done, self._last_draw = None, -1, float("-inf")
            label = "loading model" if event.kind == "model" else f"{event.name} ({event.kind})"
            self._line(cli_safety.clean(f"[{event.index}/{event.count - 1}] {label}"))
        elif isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, StepFinished):
            self._finish(event)

    def _progress(self, p) -> None:
        now = time.perf_counter()
        if self._step is None and not self._reading:  # before the first step: a dataset file being read
            self._reading = True
            self._start, self._last_done, self._last_draw = None, -1, float("-inf")
        if self._start is None and p.done > 0:
            self._start = (now, p.done)  # the rate counts from the first finished cells, not the set-up
        final = p.total and p.done >= p.total
        first_cells = self._last_done <= 0 < p.done
        if not (final or first_cells or now - self._last_draw >= self.interval):
            return
        self._last_draw, self._last_done = now, p.done
        text = self._describe(p, now)
        if self.tty:
            width = 119
            with contextlib.suppress(OSError, ValueError):
                width = os.get_terminal_size(self.stream.fileno()).columns - 1
            self.stream.write("\r" + text[:width].ljust(width))
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def _describe(self, p, now: float) -> str:
        model_step = self._step is not None and self._step.kind == "model"
        total = max(p.total, 1)
        frac = min(max(p.done / total, 0.0), 1.0)
        filled = int(round(frac * self.BAR_CELLS))
        bar = "#" * filled + "-" * (self.BAR_CELLS - filled)
        reading = self._step is None
        if model_step or reading:
            counts = f"{int(frac * 100):3d}%"
        else:
            counts = f"{p.done}/{p.total} cells ({int(frac * 100)}%)"
        extra = ""
        t0, d0 = self._start or (now, p.done)
        if not model_step and p.done > d0 and now > t0:
            rate = (p.done - d0) / (now - t0)
            speed = f"{rate / 1e6:.1f} MB/s" if reading else f"{rate:.1f} cells/s"
            extra = f", {speed}, ETA {_clock((p.total - p.done) / rate)}"
        message = f"  {cli_safety.clean(p.message)}" if p.message else ""
        return f"  |{bar}| {counts}{extra}{message}"

    def _finish(self, event) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        r = event.result
        if r is not None:
            note = f": {r.message}" if r.message and r.status != "complete" else ""
            self._line(cli_safety.clean(f"  {r.status} in {r.elapsed_s:.2f} s{note}"))

    def _line(self, text: str) -> None:
        if self._drawn:
            self.stream.write("\n")
            self._drawn = False
        self.stream.write(text + "\n")
        self.stream.flush()


@contextlib.contextmanager
def _ctrl_c_cancels(cancel, stream):
    """While inside: the first Ctrl-C cancels the token (the job stops at its next check and keeps its
    finished cells); a second one raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if cancel.cancelled:
            raise KeyboardInterrupt
        cancel.cancel()
        with contextlib.suppress(OSError, ValueError):  # os.write: a buffered stream may be mid-write here
            os.write(stream.fileno(), b"\ninterrupted: stopping after the current batch "
                                      b"(Ctrl-C again to quit at once)\n")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- run -------------------------------------------------------------------------------------------------

def _check_output_path(out: Path, what: str, inputs=()) -> None:
    """Before any work: the output is not one of `inputs` ((path, what) pairs) and can be written (a probe)."""
    from desktop_app.project.safe_output import check_writable, refuse_output_that_is_input

    refuse_output_that_is_input(out, inputs)
    check_writable(out, what)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, not {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, not {text}")
    return value


def cmd_run(argv) -> int:
    p = _Parser(prog=f"{PROG} run", description="Run every analysis of an experiment file and save a project.")
    p.add_argument("experiment", help="experiment file (JSON)")
    p.add_argument("--out", required=True, help="project file to write (.iwb)")
    p.add_argument("--device", help="override the experiment's device: auto, cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", help="override the experiment's dtype: auto, float32, float16, bfloat16")
    p.add_argument("--quantize", help="override the experiment's quantize: none, int8, int4 (needs bitsandbytes)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="rows per forward pass in patching sweeps (default: chosen from free memory)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)

    from desktop_app.engine.jobs import CancelToken
    from desktop_app.project.execute import new_project, run_experiment, with_model_overrides
    from desktop_app.project.experiment import load_experiment
    from desktop_app.project.safe_output import refuse_output_that_is_input, save_project_or_recover

    out = Path(args.out)
    _check_output_path(out, "project file", [(args.experiment, "the experiment file")])
    report = ProgressReport(quiet=args.quiet)
    experiment = load_experiment(args.experiment, progress=report)  # a dataset file: a bar with time left
    experiment.model = with_model_overrides(experiment.model, args.device, args.dtype, args.quantize)
    inputs = [(experiment.model.path, "the model")] + [
        (value, f"a file that analysis {spec.name!r} reads") for spec in experiment.analyses
        for value in spec.to_dict().values() if isinstance(value, str) and os.path.isfile(value)]
    dataset = getattr(experiment.prompts, "source", "")  # as written in the file: relative to its folder
    if dataset:
        inputs.append((Path(args.experiment).parent / os.path.expanduser(dataset), "the dataset file"))
    refuse_output_that_is_input(out, inputs)  # writability was probed above

    project = new_project(experiment)
    cancel = CancelToken()
    t0 = time.perf_counter()
    try:
        with _ctrl_c_cancels(cancel, sys.stderr):
            run_experiment(experiment, report, cancel, project=project, batch_size=args.batch_size)
    except KeyboardInterrupt:  # a second Ctrl-C: save the analyses that had finished, then stop
        cancel.cancel()
    with cli_safety.interrupts_deferred(restore=not _AS_PROGRAM):
        saved_to, save_failed, notes = save_project_or_recover(project, out)
    for note in notes:
        cli_safety.write_err("note: " + cli_safety.clean_line(note))
    if save_failed:
        _error(f"could not save {out} ({save_failed.rstrip('.')}); the results are saved in {saved_to} instead.")
        return EXIT_BAD_INPUT

    results = [e.result for e in project.analyses if e.result is not None]
    if cancel.cancelled:
        cli_safety.write_err(cli_safety.clean(f"interrupted: saved what was finished to {out} (the interrupted "
                                              f"analysis has status partial)"))
        return EXIT_INTERRUPTED
    unfinished = [r for r in results if r.status != "complete"]
    if unfinished:
        first = unfinished[0]
        internal = "traceback" in first.extras
        if internal and os.environ.get("IWB_DEBUG"):
            print(str(first.extras["traceback"]), file=sys.stderr)
        more = f" ({len(unfinished) - 1} more did not finish either)" if len(unfinished) > 1 else ""
        verb = "failed" if first.status == "failed" else "stopped early"
        _error(f"analysis {first.name!r} {verb}{more} (what finished is saved in {out}): {first.message}")
        return EXIT_INTERNAL if internal else EXIT_BAD_INPUT
    if not args.quiet:
        cli_safety.write_err(cli_safety.clean(f"wrote {out}: {len(results)} analyses complete in "
                                              f"{time.perf_counter() - t0:.1f} s"))
    return EXIT_OK


# ---- export ----------------------------------------------------------------------------------------------

def _headless_qt() -> None:
    """Figures need a QGuiApplication; without a display, Qt's offscreen platform provides one."""
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def _exportable_result(project, name: str):
    entry = project.entry(name)  # SpecError listing the names when there is no such analysis
    result = entry.result
    if result is None:
        raise CliError(f"analysis {name!r} has no result yet; run it (interp-workbench run) and export again.")
    if result.status in ("failed", "cancelled") and result.values.ndim == 0:
        reason = f" ({result.message.rstrip('.')})" if result.message else ""
        raise CliError(f"analysis {name!r} {result.status}{reason}, so there is nothing to export; fix it and run "
                       f"it again.")
    return result


def _formats_text(extra) -> str:
    return ", ".join(FIGURE_FORMATS + DATA_FORMATS + tuple(extra))


def cmd_export(argv) -> int:
    from desktop_app.project import kinds

    extra = kinds.extra_export_formats()  # formats a kind adds (gguf, json, ...) -> the kinds that offer them
    p = _Parser(prog=f"{PROG} export", description="Write one analysis as a figure or as data.")
    p.add_argument("project", help="project file (.iwb)")
    p.add_argument("--analysis", required=True, help="name of the analysis to export")
    p.add_argument("--format", help=f"{_formats_text(extra)} (default: from the --out file's extension)")
    p.add_argument("--out", required=True, help="file to write")
    p.add_argument("--width", type=_positive_int, default=1200, help="figure width in pixels (default 1200)")
    p.add_argument("--height", type=_positive_int, default=None, help="figure height in pixels (default: fits)")
    p.add_argument("--dpi", type=_positive_float, default=150.0, help="figure resolution (default 150)")
    p.add_argument("--layer", help="figure of an attention result: the layer to draw (its number in the model; "
                                   "default: the first, or the last for a rollout)")
    p.add_argument("--head", help="figure of attention patterns: the head to draw (default: the first)")
    args = p.parse_args(argv)
    selection = {dim: value for dim, value in (("layer", args.layer), ("head", args.head)) if value is not None}

    known = FIGURE_FORMATS + DATA_FORMATS + tuple(extra)
    if args.format is not None and args.format not in known:
        raise CliError(f"argument --format: invalid choice: {args.format!r} (choose from {_formats_text(extra)}).")
    fmt = args.format or Path(args.out).suffix.lower().lstrip(".")
    if fmt not in known:
        raise CliError(f"cannot tell the format from {args.out!r}; add --format {_formats_text(extra)}.")
    out = Path(args.out)
    _check_output_path(out, "file", [(args.project, "the project file")])

    from desktop_app.project.iwb import load_project

    project = load_project(args.project)
    result = _exportable_result(project, args.analysis)
    if selection and fmt not in FIGURE_FORMATS:
        raise CliError(f"--{' and --'.join(selection)} choose what a figure shows; {fmt} holds every cell of "
                       f"the result, so leave them out or export {', '.join(FIGURE_FORMATS)}.")
    if fmt in extra:
        record = kinds.find(result.kind)
        writer = record.export_format(fmt) if record is not None else None
        if writer is None:
            raise CliError(f"analysis {args.analysis!r} is a {result.kind} result, which cannot be written as {fmt} "
                           f"(only {', '.join(extra[fmt])} can); use {', '.join(FIGURE_FORMATS + DATA_FORMATS)}.")
        writer.write(result, out)
        return EXIT_OK
    if fmt in DATA_FORMATS:
        from desktop_app.project.data_export import export_csv, export_npz

        (export_csv if fmt == "csv" else export_npz)(result, out)
        return EXIT_OK
    _headless_qt()
    try:
        from desktop_app.ui import figure
    except ModuleNotFoundError as err:
        raise CliError(f"figure export is not available here ({err.name} is missing); export csv or npz "
                       f"instead.") from None
    from desktop_app.ui.figure_data import figure_context

    figure.ensure_gui_app()
    entry = project.entry(args.analysis)
    context = figure_context(entry.result_model, project.prompts)
    figure.render_figure(result, fmt, out, width_px=args.width, height_px=args.height, dpi=args.dpi, context=context,
                         selection=selection)
    return EXIT_OK


# ---- info ------------------------------------------------------------------------------------------------

def project_summary(project) -> dict:
    from desktop_app.project.iwb import jsonable

    analyses = []
    for entry in project.analyses:
        item = {"name": entry.name, "kind": entry.spec.kind,
                "parameters": {k: v for k, v in entry.spec.to_dict().items() if k not in ("name", "kind")}}
        r = entry.result
        if r is None:
            item.update(status="not run", dims=None, shape=None)
        else:
            item.update(status=r.status, dims=list(r.dims), shape=list(r.shape), message=r.message,
                        done_fraction=r.done_fraction(), clean_metric=r.clean_metric,
                        corrupted_metric=r.corrupted_metric, elapsed_s=r.elapsed_s,
                        stale=bool(project.stale_reason(entry.name)), computed_with=entry.result_model)
            if "values_per_pair" in r.extras:
                item["pairs"] = int(len(r.extras["values_per_pair"]))
        analyses.append(item)
    prompts = project.prompts.to_dict()
    if isinstance(prompts, list) or "pairs" in prompts:  # a dataset: its size and first pair, not every pair
        pairs = prompts if isinstance(prompts, list) else prompts["pairs"]
        prompts = {"pairs": len(pairs), "source": getattr(project.prompts, "source", ""), "first_pair": pairs[0]}
    return jsonable({"path": str(project.path) if project.path else None,
                     "model": project.model.to_dict() if project.model else None,
                     "prompts": prompts, "analyses": analyses})


def cmd_info(argv) -> int:
    p = _Parser(prog=f"{PROG} info", description="Print a JSON summary of a project file.")
    p.add_argument("project", help="project file (.iwb)")
    args = p.parse_args(argv)
    from desktop_app.project.iwb import load_project

    print(cli_safety.json_safe(json.dumps(project_summary(load_project(args.project)), indent=2,
                                          ensure_ascii=False)))
    return EXIT_OK


# ---- bench and the window --------------------------------------------------------------------------------

def _missing(err: ModuleNotFoundError, *modules: str) -> bool:
    return bool(err.name) and any(m == err.name or m.startswith(err.name + ".") for m in modules)


def cmd_bench(argv) -> int:
    try:
        from desktop_app import bench
    except ModuleNotFoundError as err:
        if not _missing(err, "desktop_app.bench"):
            raise
        raise CliError("the benchmark is not part of this build of Interp Workbench.") from None
    code = bench.main(list(argv))
    return EXIT_OK if code is None else int(code)


def open_window(argv, project_path: str | None = None, demo: bool = False) -> int:
    if project_path is not None:
        path = Path(project_path)
        if path.suffix.lower() == ".json":
            raise CliError(f"{path} looks like an experiment file; run it with '{PROG} run {path} --out "
                           f"PROJECT.iwb', or open a .iwb project.")
        if not path.is_file():
            raise CliError(f"project file {path} does not exist; check the path.")
    try:
        from desktop_app.ui.app import run_app
    except ModuleNotFoundError as err:
        if _missing(err, "desktop_app.ui.app"):
            raise CliError("the window is not available in this build; use the run, export and info commands."
                           ) from None
        if _missing(err, "PySide6", "pyqtgraph"):
            raise CliError(f"the window needs {err.name.split('.')[0]}, which is not installed; install it with "
                           f"pip install interp-workbench.") from None
        raise
    code = run_app([sys.argv[0] if sys.argv and sys.argv[0] else PROG] + list(argv),
                   project_path=project_path, demo=demo)
    return EXIT_OK if code is None else int(code)


def _top_parser() -> _Parser:
    p = _Parser(prog=PROG, description="Offline workbench for mechanistic interpretability.",
                epilog="commands: run EXPERIMENT.json --out PROJECT.iwb | export PROJECT.iwb --analysis NAME "
                       "--format png|svg|pdf|csv|npz --out FILE | info PROJECT.iwb | bench. "
                       f"'{PROG} COMMAND --help' describes one.")
    p.add_argument("project", nargs="?", help="project file (.iwb) to open in the window")
    p.add_argument("--demo", action="store_true", help="open the window on the bundled demo model and experiment")
    p.add_argument("--version", action="store_true", help="print the version")
    return p


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in COMMANDS:
        return {"run": cmd_run, "export": cmd_export, "info": cmd_info, "bench": cmd_bench}[argv[0]](argv[1:])
    args, qt_args = _top_parser().parse_known_args(argv)
    if args.version:
        from desktop_app import __version__

        print(f"{PROG} {__version__}")
        return EXIT_OK
    unknown = [a for a in qt_args if not a.startswith("-")]
    if unknown:
        raise CliError(f"unknown command {unknown[0]!r}; use one of {', '.join(COMMANDS)}, or give a .iwb file.")
    if args.demo and args.project:
        raise CliError("give either --demo or a project file, not both.")
    return open_window(qt_args, project_path=args.project, demo=args.demo)  # leftover -options go to Qt


_AS_PROGRAM = False  # main() runs as the program (not called from Python with its own argv)


def main(argv=None) -> int:
    global _AS_PROGRAM
    _AS_PROGRAM = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bad = cli_safety.bad_argument(argv)
        if bad:
            raise CliError(f"{bad}; see '{PROG} --help'.")
        return _dispatch(argv)
    except WorkbenchError as err:
        _error(str(err))
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        cli_safety.write_err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `interp-workbench info P.iwb | head`: the reader left; nothing more to say
        cli_safety.quiet_broken_pipe()
        return EXIT_OK
    except MemoryError:
        _error("ran out of memory; close other programs, or use a smaller --batch-size or a smaller model.")
        return EXIT_BAD_INPUT
    except OSError as err:  # a path the system refuses (too long, a loop of symlinks, ...)
        where = f" ({err.filename})" if err.filename else ""
        _error(f"{err.strerror or err}{where}; check the paths given.")
        return EXIT_BAD_INPUT
    except Exception as err:  # noqa: BLE001 - a bug: one line, and the traceback only on request
        if os.environ.get("IWB_DEBUG"):
            import traceback
            traceback.print_exc()
        _error(f"internal error ({type(err).__name__}: {err}); please report it (IWB_DEBUG=1 shows the details).")
        return EXIT_INTERNAL
    except SystemExit as exit_:  # --help
        return exit_.code if isinstance(exit_.code, int) else (EXIT_OK if exit_.code is None else EXIT_BAD_INPUT)
