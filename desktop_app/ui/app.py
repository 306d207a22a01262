"""Start the window: `run_app(argv, project_path=None, demo=False)` creates the QApplication, shows the
main window and runs the event loop. Torch is not imported on this path (the runner thread imports it).

`python -m desktop_app.ui.app --launch-probe` prints `visible <seconds since start>` once the window is
shown and the event loop runs, then quits: the bench uses it for the launch-to-window time.
"""
from __future__ import annotations

import sys
import time

from desktop_app.demo_assets import resources_dir

_T0 = time.perf_counter()


def make_application(argv):
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(list(argv))
    app.setApplicationName("Interp Workbench")
    app.setOrganizationName("interp-workbench")
    app.setApplicationDisplayName("Interp Workbench")
    app.setDesktopFileName("interp-workbench")  # matches packaging/interp-workbench.desktop
    icon = resources_dir() / "icon.png"
    if icon.is_file():
        from PySide6.QtGui import QIcon

        app.setWindowIcon(QIcon(str(icon)))
    return app


def run_app(argv=None, project_path=None, demo: bool = False) -> int:
    argv = list(sys.argv if argv is None else argv)
    probe = "--launch-probe" in argv
    argv = [a for a in argv if a != "--launch-probe"]
    app = make_application(argv)
    from desktop_app.ui import create_main_window

    window = create_main_window(argv, project_path=project_path, demo=demo)
    window.show()
    if probe:
        from PySide6.QtCore import QTimer

        def report():
            print(f"visible {time.perf_counter() - _T0:.4f} torch_loaded={'torch' in sys.modules}", flush=True)
            window.confirm_dialogs = False
            window.close()
            app.quit()
        QTimer.singleShot(0, report)
    return int(app.exec())


if __name__ == "__main__":
    sys.exit(run_app(sys.argv))
