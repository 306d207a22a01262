"""Causal tracing (ROME): restore clean activations into a run with the subject's embeddings noised."""
from __future__ import annotations

from desktop_app.project import dataset_jobs
from desktop_app.project.kinds import AnalysisKind, prompt_pair, register_kind
from desktop_app.project.specs import CausalTracingSpec


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.tracing import causal_tracing_job

    pair = prompt_pair(lm, prompts, need_corrupted=False, need_wrong=False)
    return causal_tracing_job(lm, pair, subject=spec.subject, noise=spec.noise, samples=spec.samples,
                              component=spec.component, window=spec.window, seed=spec.seed, name=spec.name,
                              cancel=cancel, batch_size=batch_size)


register_kind(AnalysisKind(
    kind="causal_tracing", label="Causal tracing", short="tracing", spec=CausalTracingSpec, job=_job,
    dims="[layer, position]", value_name="answer probability", scale="sequential", view="heatmap",
    click="predictions", dataset_job=dataset_jobs.causal_tracing,
    description="Noise the subject's embeddings, restore one clean activation, read the answer's probability."))
