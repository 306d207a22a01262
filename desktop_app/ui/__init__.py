"""The Qt layer (PySide6 + pyqtgraph). `create_main_window` builds the window exactly as the program does.

Start-up imports only Qt, pyqtgraph, numpy and desktop_app.project; torch is imported by the runner thread.
"""
from __future__ import annotations

from pathlib import Path


def parse_window_args(argv) -> tuple[str | None, bool]:
    """(project path or None, demo) from the window's command line (`PROJECT.iwb`, `--demo`)."""
    project, demo = None, False
    for arg in argv or []:  # argv[0] (the program) never ends in .iwb, so scanning all of it is safe
        arg = str(arg)
        if arg == "--demo":
            demo = True
        elif not arg.startswith("-") and arg.lower().endswith(".iwb"):
            project = arg
    return project, demo


def create_main_window(argv=None, project_path=None, demo: bool = False):
    """Build and return the main window (a QApplication must exist; no event loop is started).

    `argv` may name a project file (`PROJECT.iwb`) and `--demo`, as on the command line.
    """
    from PySide6.QtWidgets import QApplication

    if QApplication.instance() is None:
        raise RuntimeError("create_main_window needs a QApplication; create one first")
    from desktop_app.ui.main_window import MainWindow

    arg_project, arg_demo = parse_window_args(argv)
    project_path = project_path or arg_project
    window = MainWindow()
    if project_path:
        window.open_project(Path(project_path), confirmed=True)
    elif demo or arg_demo:
        from desktop_app.ui.demo import open_demo
        open_demo(window)
    else:
        window.offer_recovery()
    return window


__all__ = ["create_main_window"]
