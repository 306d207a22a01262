"""Activation patching and attribution patching: [layer, position] / [layer, head] sweeps of one component."""
from __future__ import annotations

from desktop_app.project import dataset_jobs
from desktop_app.project.kinds import AnalysisKind, prompt_pair, register_kind, with_raw_logit_diffs
from desktop_app.project.specs import ActivationPatchingSpec, AttributionPatchingSpec

_DIMS = "[layer, position] (each) or [layer] (all); head_out: [layer, position, head] or [layer, head]"


def _metric(params: dict) -> str:
    return str(params.get("metric") or "value")


def _activation_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.patching import activation_patching_job

    pair = prompt_pair(lm, prompts, need_wrong=dataset_jobs.metric_needs_wrong(spec.metric))
    job = activation_patching_job(lm, pair, component=spec.component, positions=spec.positions,
                                  direction=spec.direction, metric=dataset_jobs.engine_metric(lm, spec.metric), name=spec.name,
                                  layers=spec.layers, cancel=cancel, batch_size=batch_size)
    needs_wrong = dataset_jobs.metric_needs_wrong(spec.metric)
    return with_raw_logit_diffs(lm, pair if needs_wrong else None, dataset_jobs.recorded_as(job, spec))


def _attribution_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.attribution import attribution_patching_job

    pair = prompt_pair(lm, prompts, need_wrong=dataset_jobs.metric_needs_wrong(spec.metric))
    job = attribution_patching_job(lm, pair, component=spec.component, positions=spec.positions,
                                   direction=spec.direction, metric=dataset_jobs.engine_metric(lm, spec.metric),
                                   name=spec.name, cancel=cancel)
    needs_wrong = dataset_jobs.metric_needs_wrong(spec.metric)
    return with_raw_logit_diffs(lm, pair if needs_wrong else None, dataset_jobs.recorded_as(job, spec))


def _skeleton(lm, prompts, spec):
    """The empty sweep result (NaN cells, dims, labels), so the window draws streamed cells before the end."""
    from desktop_app.engine.patching import new_sweep_result

    _plan, result = new_sweep_result(lm, prompt_pair(lm, prompts), spec.kind, spec.component, spec.positions,
                                     spec.direction, dataset_jobs.engine_metric(lm, spec.metric), spec.name,
                                     getattr(spec, "layers", None))
    result.params["metric"] = spec.metric
    result.status = "partial"
    return result


register_kind(AnalysisKind(
    kind="activation_patching", label="Activation patching", short="patching", spec=ActivationPatchingSpec,
    job=_activation_job, dims=_DIMS, value_name=_metric, scale="diverging", view="heatmap",
    click="patched_predictions", skeleton=_skeleton, dataset_job=dataset_jobs.activation_patching,
    description="Patch one activation from the other prompt's run, cell by cell, and measure the metric."))

register_kind(AnalysisKind(
    kind="attribution_patching", label="Attribution patching", short="attribution", spec=AttributionPatchingSpec,
    job=_attribution_job, dims=_DIMS, value_name=_metric, scale="diverging", view="heatmap",
    click="patched_predictions", skeleton=_skeleton, dataset_job=dataset_jobs.attribution_patching,
    description="The linear (gradient) estimate of every activation patch, from two forward and one backward pass."))
