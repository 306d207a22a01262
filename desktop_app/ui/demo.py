"""`--demo`: open the window on the bundled demo model and demo experiment, ready to run.

The demo lives in resources/demo/ (model/ folder and experiment.json) or in the folder named by
INTERP_WORKBENCH_DEMO_DIR. Without it the window still opens with the IOI demo prompts filled in.
"""
from __future__ import annotations

from desktop_app.demo_assets import demo_dir
from desktop_app.project.document import Project
from desktop_app.project.specs import ModelRef, Prompts


def demo_project() -> tuple[Project, str]:
    """(the demo project, a note for the user or "")."""
    from desktop_app.demo_task import ioi_examples

    folder = demo_dir()
    experiment = folder / "experiment.json"
    if experiment.is_file():
        from desktop_app.project.experiment import load_experiment

        exp = load_experiment(experiment)
        project = Project(model=exp.model, prompts=exp.prompts)
        for spec in exp.analyses:
            project.add_analysis(spec)
        return project, ""
    ex = ioi_examples(1, seed=0)[0]
    prompts = Prompts(clean=ex.clean, corrupted=ex.corrupted, answer=ex.answer, wrong_answer=ex.wrong)
    model = folder / "model"
    if (model / "config.json").is_file():
        return Project(model=ModelRef(str(model)), prompts=prompts), ""
    return Project(prompts=prompts), (f"the demo model is not installed (looked in {folder}); choose a model "
                                      "folder and click Load.")


def open_demo(window) -> None:
    from desktop_app.engine.errors import WorkbenchError

    try:
        project, note = demo_project()
    except WorkbenchError as err:
        window.show_error(str(err))
        return
    window.set_project(project)
    project.mark_saved(None)
    if note:
        window.show_message(note, "warning")
    window._after_open()
