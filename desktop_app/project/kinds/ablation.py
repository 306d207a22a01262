"""Ablation: replace an activation (zero, mean, noise, resample) and measure the metric."""
from __future__ import annotations

from desktop_app.project import dataset_jobs
from desktop_app.project.kinds import AnalysisKind, prompt_pair, register_kind, with_raw_logit_diffs
from desktop_app.project.specs import AblationSpec


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.ablation import ablation_job

    # the corrupted prompt is the resample source and the baseline of logit_diff_recovered
    need_corrupted = (spec.method == "resample" or spec.metric == "logit_diff_recovered"
                      or bool(prompts.corrupted.strip()))
    pair = prompt_pair(lm, prompts, need_corrupted=need_corrupted,
                       need_wrong=dataset_jobs.metric_needs_wrong(spec.metric))
    job = ablation_job(lm, pair, component=spec.component, method=spec.method, positions=spec.positions,
                       metric=dataset_jobs.engine_metric(lm, spec.metric), layers=spec.layers,
                       reference_prompts=spec.reference_prompts, mean_over=spec.mean_over, noise=spec.noise,
                       seed=spec.seed, source_prompt=spec.source_prompt, name=spec.name, cancel=cancel,
                       batch_size=batch_size)
    needs_wrong = dataset_jobs.metric_needs_wrong(spec.metric)
    return with_raw_logit_diffs(lm, pair if needs_wrong else None, dataset_jobs.recorded_as(job, spec))


register_kind(AnalysisKind(
    kind="ablation", label="Ablation", short="ablation", spec=AblationSpec, job=_job,
    dims="[layer] or [layer, head] (all positions); with a position dim for each",
    value_name=lambda params: str(params.get("metric") or "value"), scale="diverging", view="heatmap",
    click="predictions", dataset_job=dataset_jobs.ablation,
    description="Replace an activation by zero, its mean, noise or another prompt's, and measure the metric."))
