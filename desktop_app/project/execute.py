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
from desktop_app.project.document import Project
from desktop_app.project.specs import AnalysisSpec, ModelRef, Prompts

_METRICS_WITH_WRONG = ("logit_diff", "logit_diff_recovered")


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

def _pair(lm, prompts: Prompts, need_corrupted=True, need_wrong=True):
    from desktop_app.engine.prompts import prepare_pair

    return prepare_pair(lm, prompts.clean, prompts.corrupted, prompts.answer, prompts.wrong_answer,
                        prompts.prepend_bos, need_corrupted=need_corrupted, need_wrong=need_wrong)


def _sae_text(prompts: Prompts, which: str) -> str:
    if which == "clean":
        return prompts.clean
    if which == "corrupted":
        return prompts.corrupted
    return which


def analysis_job(lm, prompts: Prompts, spec: AnalysisSpec, cancel: CancelToken | None = None,
                 batch_size: int | None = None):
    """The engine job (a generator returning an AnalysisResult) that computes `spec` on `lm`.

    Raises SpecError / PromptError right away (before the first event) when the spec cannot run."""
    cancel = cancel or CancelToken()
    kind = spec.kind
    if kind == "activation_patching":
        from desktop_app.engine.patching import activation_patching_job

        return activation_patching_job(lm, _pair(lm, prompts), component=spec.component,
                                       positions=spec.positions, direction=spec.direction, metric=spec.metric,
                                       name=spec.name, layers=spec.layers, cancel=cancel, batch_size=batch_size)
    if kind == "attribution_patching":
        from desktop_app.engine.attribution import attribution_patching_job

        return attribution_patching_job(lm, _pair(lm, prompts), component=spec.component,
                                        positions=spec.positions, direction=spec.direction, metric=spec.metric,
                                        name=spec.name, cancel=cancel)
    if kind == "causal_tracing":
        from desktop_app.engine.tracing import causal_tracing_job

        pair = _pair(lm, prompts, need_corrupted=False, need_wrong=False)
        return causal_tracing_job(lm, pair, subject=spec.subject, noise=spec.noise, samples=spec.samples,
                                  component=spec.component, window=spec.window, seed=spec.seed, name=spec.name,
                                  cancel=cancel, batch_size=batch_size)
    if kind == "ablation":
        from desktop_app.engine.ablation import ablation_job

        # the corrupted prompt is the resample source and the baseline of logit_diff_recovered
        need_corrupted = (spec.method == "resample" or spec.metric == "logit_diff_recovered"
                          or bool(prompts.corrupted.strip()))
        pair = _pair(lm, prompts, need_corrupted=need_corrupted, need_wrong=spec.metric in _METRICS_WITH_WRONG)
        return ablation_job(lm, pair, component=spec.component, method=spec.method, positions=spec.positions,
                            metric=spec.metric, layers=spec.layers, reference_prompts=spec.reference_prompts,
                            mean_over=spec.mean_over, noise=spec.noise, seed=spec.seed,
                            source_prompt=spec.source_prompt, name=spec.name, cancel=cancel, batch_size=batch_size)
    if kind == "sae_features":
        from desktop_app.engine.sae.jobs import sae_features_job

        return sae_features_job(lm, sae_path=spec.sae, hook=spec.hook, top_k=spec.top_k, name=spec.name,
                                cancel=cancel, prompt_label=spec.prompt, text=_sae_text(prompts, spec.prompt),
                                prepend_bos=prompts.prepend_bos)
    raise SpecError(f"analysis {spec.name!r} has kind {kind!r}, which this version cannot run; "
                    f"remove it or update the app.")


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
    project.set_model(dataclasses.replace(model, config_hash=lm.config_hash or "", memory_bytes=lm.info.memory_bytes))
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
