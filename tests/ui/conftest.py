"""Fixtures for window tests: private settings / autosave / recent folders, and the real main window."""
import pytest


@pytest.fixture(autouse=True)
def _private_app_dirs(tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("INTERP_WORKBENCH_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def window(qtbot):
    from desktop_app.ui import create_main_window

    w = create_main_window([])
    w.confirm_dialogs = False
    qtbot.addWidget(w)
    w.show()
    qtbot.waitExposed(w)
    yield w
    if w.isVisible():
        w.close()
    w.runner.shutdown()
