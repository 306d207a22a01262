"""Helpers shared by the window tests: drive widgets by object name and wait for the runner."""
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QWidget

from desktop_app.demo_task import IOIExample

IOI = IOIExample("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")


def child(window, name: str, cls=QWidget):
    w = window.findChild(cls, name)
    assert w is not None, f"no widget named {name}"
    return w


def load_model(qtbot, window, path, timeout=60_000):
    child(window, "modelPathEdit").setText(str(path))
    qtbot.mouseClick(child(window, "loadModelButton"), Qt.LeftButton)
    qtbot.waitUntil(lambda: window.model_loaded is not None or window.message_bar.level == "error",
                    timeout=timeout)


def type_prompts(window, ex=IOI):
    for name, text in (("cleanPromptEdit", ex.clean), ("corruptedPromptEdit", ex.corrupted),
                       ("answerEdit", ex.answer), ("wrongAnswerEdit", ex.wrong)):
        child(window, name).setText(text)


def engine_result(model_dir, ex=IOI, component="resid_pre", positions="each"):
    """The engine's result computed directly, without the window."""
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model as load
    from desktop_app.engine.patching import activation_patching_job
    from desktop_app.engine.prompts import prepare_pair

    lm = load(str(model_dir), dtype="float32", device="cpu")
    pair = prepare_pair(lm, ex.clean, ex.corrupted, ex.answer, ex.wrong)
    return lm, pair, drive(activation_patching_job(lm, pair, component, positions, "denoise",
                                                   "logit_diff_recovered"))
