"""Ablation: replace an activation (zero, mean, noise, resample) and measure the metric."""
from __future__ import annotations

from desktop_app.project.kinds import AnalysisKind, prompt_pair, register_kind, with_raw_logit_diffs
from desktop_app.project.specs import AblationSpec

_METRICS_WITH_WRONG = ("logit_diff", "logit_diff_recovered")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.ablation import ablation_job

    # the corrupted prompt is the resample source and the baseline of logit_diff_recovered
    need_corrupted = (spec.method == "resample" or spec.metric == "logit_diff_recovered"
                      or bool(prompts.corrupted.strip()))
    pair = prompt_pair(lm, prompts, need_corrupted=need_corrupted, need_wrong=spec.metric in _METRICS_WITH_WRONG)
    job = ablation_job(lm, pair, component=spec.component, method=spec.method, positions=spec.positions,
                       metric=spec.metric, layers=spec.layers, reference_prompts=spec.reference_prompts,
                       mean_over=spec.mean_over, noise=spec.noise, seed=spec.seed, source_prompt=spec.source_prompt,
                       name=spec.name, cancel=cancel, batch_size=batch_size)
    return with_raw_logit_diffs(lm, pair if spec.metric in _METRICS_WITH_WRONG else None, job)


register_kind(AnalysisKind(
    kind="ablation", label="Ablation", short="ablation", spec=AblationSpec, job=_job,
    dims="[layer] or [layer, head] (all positions); with a position dim for each",
    value_name=lambda params: str(params.get("metric") or "value"), scale="diverging", view="heatmap",
    click="predictions",
    description="Replace an activation by zero, its mean, noise or another prompt's, and measure the metric."))
