"""File menu of the real window: save and reopen a project, a missing model folder, export, autosave."""
import numpy as np
from PySide6.QtWidgets import QProgressBar

from ui_helpers import child, load_model, type_prompts


def _sweep(qtbot, window, model_dir):
    load_model(qtbot, window, model_dir)
    type_prompts(window)
    with qtbot.waitSignal(window.analysis_ended, timeout=60_000):
        child(window, "runButton").click()
    return window.current_result()


def test_save_reopen_export_and_missing_model(qtbot, window, ioi_gpt2_dir, tmp_path):
    from desktop_app.project.iwb import load_project, save_project
    from desktop_app.project.specs import ModelRef
    from desktop_app.ui import create_main_window

    result = _sweep(qtbot, window, ioi_gpt2_dir)
    path = tmp_path / "session.iwb"
    assert window.save_to(path)
    assert not window.isWindowModified() and window.windowTitle().startswith("session")
    assert load_project(path).entry(result.name).result.values.shape == result.values.shape
    # figure and data exports, read back
    assert window.export_figure(tmp_path / "fig.png") and (tmp_path / "fig.png").stat().st_size > 1000
    assert window.export_data(tmp_path / "data.npz")
    with np.load(tmp_path / "data.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(z["values"], result.values)
    # the project's model folder has moved: results still open, the user is asked to relocate
    project = load_project(path)
    project.set_model(ModelRef(str(tmp_path / "moved-away")))
    save_project(project, tmp_path / "moved.iwb")
    other = create_main_window([str(tmp_path / "moved.iwb")])
    other.confirm_dialogs = False
    qtbot.addWidget(other)
    try:
        np.testing.assert_allclose(other.result_view.image_data(), result.values, atol=1e-6)
        assert other.message_bar.level == "warning" and "moved-away" in other.message_bar.text()
        assert other.model_loaded is None
    finally:
        other.close()


def test_autosave_is_offered_back(qtbot, window, tmp_path):
    from desktop_app.project import autosave
    from desktop_app.ui import create_main_window

    child(window, "cleanPromptEdit").setText("an unsaved prompt")
    window.autosave_now()
    assert autosave.find_recovery() is not None
    other = create_main_window([])
    other.confirm_dialogs = False
    qtbot.addWidget(other)
    try:
        assert "restore" in other.message_bar.text()
        child(other, "messageActionButton").click()
        assert child(other, "cleanPromptEdit").text() == "an unsaved prompt"
        assert other.isWindowModified()
    finally:
        other.close()


def test_run_without_model_is_an_error_in_the_window(qtbot, window):
    child(window, "runButton").click()
    assert window.message_bar.level == "error" and "no model" in window.message_bar.text()
    assert child(window, "progressBar", QProgressBar).value() == 0


def test_hostile_files_around_the_window(qtbot, window, tmp_path):
    """A corrupt recovery note does not stop the window; a lone surrogate is saved escaped and said so; a save
    that loses a race with another program says where its version went; a pipe is refused, not waited on."""
    import json
    import os

    from desktop_app.project import autosave
    from desktop_app.project.iwb import load_project
    from desktop_app.project.specs import Prompts
    from desktop_app.ui import create_main_window

    child(window, "cleanPromptEdit").setText("an unsaved prompt")
    window.autosave_now()
    rec = autosave.recovery_dir()
    (rec / autosave.RECOVERY_META).write_text(json.dumps({"original_path": 7, "saved_at": 1e300}))
    other = create_main_window([])
    other.confirm_dialogs = False
    qtbot.addWidget(other)
    try:
        assert "restore" in other.message_bar.text()
    finally:
        other.close()

    window.project.set_prompts(Prompts("broken \ud800 text"))
    path = tmp_path / "s.iwb"
    assert window.save_to(path)
    assert window.message_bar.level == "warning" and "escaped" in window.message_bar.text()
    assert load_project(path).prompts.clean == "broken \\ud800 text"

    from desktop_app.project import iwb
    from desktop_app.project.atomic import atomic_write
    real = iwb.write_archive

    def racing(project, f):
        real(project, f)
        theirs = load_project(path)  # another program saves the same file meanwhile
        atomic_write(path, lambda g: real(theirs, g), backup=True)

    window.project.set_prompts(Prompts("mine"))
    iwb._write_archive, saved = racing, iwb._write_archive
    try:
        assert not window.save_to(path)
    finally:
        iwb._write_archive = saved
    assert window.message_bar.level == "error" and "another window or program" in window.message_bar.text()
    assert window.isWindowModified()

    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "pipe.iwb")
        assert not window.open_project(tmp_path / "pipe.iwb", confirmed=True)
        assert "pipe" in window.message_bar.text()
