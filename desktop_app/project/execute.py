"""From specs to engine jobs: one analysis spec becomes one job generator, an experiment becomes a Project.

Torch stays off the import path: the engine modules are imported inside the functions, so the window and
`interp-workbench info` start without it.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from desktop_app.engine.errors import JobCancelled, SpecError, WorkbenchError
from desktop_app.engine.jobs import CancelToken
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.project.document import Project
from desktop_app.project.specs import AnalysisSpec, ModelRef, Prompts


# ---- events run_experiment passes on, besides the jobs' own Progress / Partial ----------------------------

@dataclass
class StepStarted:
    """A step begins: step 0 is loading the model, then one step per analysis (`name` is its name)."""
    index: int
    count: int
    name: str
    kind: str  # "model" or the analysis kind


@dataclass
class StepFinished:
    index: int
    count: int
    name: str
    result: AnalysisResult | None  # None for the model step


# ---- one analysis ------------------------------------------------------------------------------------------

def analysis_job(lm, prompts: Prompts, spec: AnalysisSpec, cancel: CancelToken | None = None,
                 batch_size: int | None = None):
    """The engine job (a generator returning an AnalysisResult) that computes `spec` on `lm`: the job factory of
    the spec's kind in the registry (project.kinds).

    Raises SpecError / PromptError right away (before the first event) when the spec cannot run."""
    cancel = cancel or CancelToken()
    record = kinds.get(spec.kind)  # SpecError for a kind this version cannot run
    from desktop_app.project.dataset_prompts import is_dataset

    if is_dataset(prompts):
        if record.dataset_job is None:
            raise SpecError(f"analysis {spec.name!r}: {record.label.lower()} runs on one prompt pair, not on a dataset "
                            "of pairs; use a single pair for it.")
        return record.dataset_job(lm, prompts, spec, cancel, batch_size)
    return record.job(lm, prompts, spec, cancel, batch_size)


def failed_result(spec: AnalysisSpec, message: str, elapsed_s: float = 0.0) -> AnalysisResult:
    """The result stored for an analysis that could not run: no cells, status failed, the reason."""
    params = {k: v for k, v in spec.to_dict().items() if k not in ("name", "kind")}
    return AnalysisResult(name=spec.name, kind=spec.kind, params=params, dims=[],
                          values=np.full((), np.nan, dtype=np.float32), status="failed", message=message,
                          elapsed_s=elapsed_s)


# ---- a whole experiment ------------------------------------------------------------------------------------

def new_project(experiment) -> Project:
    """A Project holding the experiment's model, prompts and analyses, with no results yet."""
    project = Project(model=experiment.model, prompts=experiment.prompts)
    for spec in experiment.analyses:
        project.add_analysis(spec)
    return project


def run_experiment(experiment, on_event: Callable[[Any], None] | None = None,
                   cancel: CancelToken | None = None, *, project: Project | None = None,
                   batch_size: int | None = None) -> Project:
    """Load the model once, run every analysis in order and store each result in the project.

    Errors of one analysis (a SpecError, a PromptError, a bug) become a `failed` result with the message and
    the next analysis still runs. When `cancel` is set, the running analysis keeps its finished cells with
    status `partial` and the later ones are not run. A model that cannot be loaded raises ModelLoadError.
    Pass `project` (from new_project) to keep what is finished even if this call is interrupted."""
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model_job

    cancel = cancel or CancelToken()
    emit = on_event or (lambda event: None)
    project = project if project is not None else new_project(experiment)
    count = len(experiment.analyses) + 1
    model = experiment.model

    emit(StepStarted(0, count, "model", "model"))
    try:
        lm = drive(load_model_job(model.path, model.dtype, model.device, model.trust_remote_code, cancel,
                                  model.quantize), emit)
    except JobCancelled:
        return project
    conformance = lm.conformance.to_dict() if lm.conformance is not None else None
    project.set_model(dataclasses.replace(model, config_hash=lm.config_hash or "", conformance=conformance,
                                          memory_bytes=lm.info.memory_bytes))
    emit(StepFinished(0, count, "model", None))

    for i, spec in enumerate(experiment.analyses, start=1):
        if cancel.cancelled:
            break
        emit(StepStarted(i, count, spec.name, spec.kind))
        t0 = time.perf_counter()
        try:
            result = drive(analysis_job(lm, experiment.prompts, spec, cancel, batch_size=batch_size), emit)
        except WorkbenchError as err:
            result = failed_result(spec, str(err), time.perf_counter() - t0)
        except JobCancelled:  # a job that did not turn the cancel into a partial result itself
            result = failed_result(spec, "cancelled before any cell was finished", time.perf_counter() - t0)
            result.status = "cancelled"
        except Exception as err:  # noqa: BLE001 - a bug in one analysis must not lose the others
            result = failed_result(spec, f"internal error ({type(err).__name__}: {err}); please report it",
                                   time.perf_counter() - t0)
            result.extras = {"traceback": np.array(traceback.format_exc())}
        if result is None:
            result = failed_result(spec, "the analysis returned no result; please report it")
        project.set_result(spec.name, result)
        emit(StepFinished(i, count, spec.name, result))
    return project


def with_model_overrides(model: ModelRef, device: str | None = None, dtype: str | None = None,
                         quantize: str | None = None) -> ModelRef:
    """The model reference with the command line's --device / --dtype / --quantize applied (validated by
    ModelRef)."""
    changes = {k: v for k, v in (("device", device), ("dtype", dtype), ("quantize", quantize)) if v is not None}
    return dataclasses.replace(model, **changes) if changes else model


__all__ = ["StepFinished", "StepStarted", "analysis_job", "failed_result", "new_project", "run_experiment",
           "with_model_overrides"]
