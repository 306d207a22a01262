"""`interp-workbench --demo`: the window opens on the bundled model and experiment, ready to run, and one click
shows the circuit the user guide describes."""
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt

from desktop_app.ui import create_main_window
from ui_helpers import child


def test_demo_opens_loaded_and_runs(qtbot):
    window = create_main_window(["interp-workbench", "--demo"])
    window.confirm_dialogs = False
    qtbot.addWidget(window)
    window.show()
    try:
        qtbot.waitUntil(lambda: window.model_loaded is not None, timeout=60_000)
        assert [e.name for e in window.project.analyses] == ["resid", "heads", "attribution", "graph"]
        graph_spec = window.project.analyses[3].spec  # the shipped transcoders, found from the demo folder
        assert (Path(graph_spec.transcoders) / "config.yaml").is_file()
        assert child(window, "cleanPromptEdit").text().endswith("John gave a drink to")
        assert child(window, "answerEdit").text() == " Mary"
        assert window.project.model.path.endswith("model")
        # opening the demo and loading its model is not an edit
        assert window.project.model.config_hash and not window.project.dirty and not window.isWindowModified()
        with qtbot.waitSignal(window.analysis_ended, timeout=60_000) as ended:
            qtbot.mouseClick(child(window, "runButton"), Qt.LeftButton)
        assert ended.args == ["done"]
        result = window.project.analyses[0].result
        assert result is not None and result.status == "complete"
        assert result.values[0, 9] > 0.99 and int(np.argmax(result.values[2])) == 13
    finally:
        window.close()
        window.runner.shutdown()


def test_export_experiment_runs_headless(qtbot, tmp_path, ioi_gpt2_dir):
    """File -> Export experiment writes a file that `interp-workbench run` executes unchanged."""
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project
    from desktop_app.project.specs import ActivationPatchingSpec, ModelRef, Prompts
    from desktop_app.project.document import Project

    window = create_main_window([])
    window.confirm_dialogs = False
    qtbot.addWidget(window)
    project = Project(model=ModelRef(str(ioi_gpt2_dir)),
                      prompts=Prompts("When Mary and John went to the store, John gave a drink to",
                                      "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"))
    project.add_analysis(ActivationPatchingSpec(name="resid", component="resid_pre"))
    window.set_project(project)
    try:
        assert window.export_experiment(tmp_path / "exp.json")
        assert main(["run", str(tmp_path / "exp.json"), "--out", str(tmp_path / "p.iwb"), "-q"]) == 0
        done = load_project(tmp_path / "p.iwb")
        assert done.prompts == project.prompts and done.analyses[0].spec == project.analyses[0].spec
        assert done.analyses[0].result.status == "complete"
    finally:
        window.close()
        window.runner.shutdown()
