"""Job factories for the registry (project.kinds): every kind over a dataset of pairs, and written metrics.

A kind's `dataset_job(lm, prompts, spec, cancel, batch_size)` runs when the prompts are a `DatasetPrompts`:
activation patching takes the batched dataset path (engine.dataset_patching), the other kinds the per-pair
runner (engine.dataset_runner). Torch stays off the import path (engine modules are imported inside).
"""
from __future__ import annotations

from desktop_app.project.specs import METRICS


def engine_metric(lm, metric):
    """A spec's metric as a single-pair engine job takes it: a built-in name, or the expression bound to the
    model's vocabulary (a callable)."""
    if not isinstance(metric, str) or metric in METRICS:
        return metric
    from desktop_app.engine.metric_expr import MetricExpression

    return MetricExpression(metric).bind(lm.single_token_id)


def metric_needs_wrong(metric) -> bool:
    from desktop_app.engine.pair_metrics import metric_needs_wrong as needs

    return needs(metric)


def recorded_as(job, spec):
    """The job, with the spec's metric (a name or the expression's text) in the result's params instead of the
    bound object the engine saw."""
    result = yield from job
    if result is not None and "metric" in (result.params or {}):
        result.params["metric"] = spec.metric
    return result


def _data(lm, prompts, need_wrong: bool = True):
    from desktop_app.engine.datasets import tokenize_dataset

    return tokenize_dataset(lm, prompts.dataset(), prompts.prepend_bos, need_wrong=need_wrong)


def _positions_for(data) -> str:
    """Kinds without a positions field: by index when the prompts line up, else by the dataset's names."""
    return "named" if data.position_names and not data.aligned else "each"


def activation_patching(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_patching import dataset_patching_job

    return dataset_patching_job(lm, _data(lm, prompts, metric_needs_wrong(spec.metric)), spec.component,
                                spec.positions, spec.direction, spec.metric, spec.name, spec.layers, cancel,
                                batch_size)


def attribution_patching(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_runner import dataset_attribution_job

    return dataset_attribution_job(lm, _data(lm, prompts, metric_needs_wrong(spec.metric)), spec.component,
                                   spec.positions, spec.direction, spec.metric, spec.name, cancel=cancel)


def ablation(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_runner import dataset_ablation_job

    return dataset_ablation_job(lm, _data(lm, prompts, metric_needs_wrong(spec.metric)), spec.component,
                                spec.method, spec.positions, spec.metric, spec.name, cancel, batch_size,
                                layers=spec.layers, reference_prompts=spec.reference_prompts,
                                mean_over=spec.mean_over, noise=spec.noise, seed=spec.seed,
                                source_prompt=spec.source_prompt)


def causal_tracing(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_runner import dataset_tracing_job

    data = _data(lm, prompts, need_wrong=False)
    return dataset_tracing_job(lm, data, spec.subject, spec.noise, spec.samples, spec.component, spec.window,
                               spec.seed, spec.name, _positions_for(data), cancel, batch_size)


def sae_features(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_runner import dataset_sae_features_job
    from desktop_app.engine.errors import SpecError

    if spec.prompt not in ("clean", "corrupted"):
        raise SpecError(f"analysis {spec.name!r}: over a dataset, the SAE features prompt must be clean or "
                        "corrupted, not a literal text.")
    data = _data(lm, prompts, need_wrong=False)
    return dataset_sae_features_job(lm, data, spec.sae, spec.hook, spec.top_k, spec.prompt, spec.name,
                                    _positions_for(data), cancel)
