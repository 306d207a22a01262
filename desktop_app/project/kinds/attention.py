"""Attention patterns of every head, and attention rollout / flow across layers (Abnar & Zuidema)."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, leading_slices, register_kind
from desktop_app.project.kinds._reading import prompt_field, tokens_of, with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class AttentionPatternsSpec(AnalysisSpec):
    prompt: str = prompt_field()
    layers: tuple[int, ...] | None = param(None, widget="layers", tip="Layers to show, e.g. 0, 2 (empty: every layer)")
    heads: tuple[int, ...] | None = param(None, widget="layers", tip="Heads to show, e.g. 0, 3 (empty: every head)")


@dataclass(frozen=True)
class AttentionRolloutSpec(AnalysisSpec):
    prompt: str = prompt_field()
    residual: float = param(0.5, widget="float", minimum=0.0, maximum=1.0, step=0.1,
                            tip="r: each layer's pattern becomes (1 - r) A + r I before the product")
    head_fusion: str = param("mean", widget="choice", choices=("mean", "max"), tip="How the heads of a layer are fused")
    method: str = param("rollout", widget="choice", choices=("rollout", "flow"),
                        tip="rollout: product of the patterns; flow: exact maximum flow (short prompts)")


def _patterns_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.attention_views import attention_patterns_job

    return with_spec_params(attention_patterns_job(
        lm, tokens_of(lm, prompts, spec), layers=spec.layers or "all", heads=spec.heads or "all", name=spec.name,
        prompt_label=spec.prompt, cancel=cancel), spec)


def _rollout_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.attention_views import attention_rollout_job

    return with_spec_params(attention_rollout_job(
        lm, tokens_of(lm, prompts, spec), residual=spec.residual, head_fusion=spec.head_fusion, method=spec.method,
        name=spec.name, prompt_label=spec.prompt, cancel=cancel), spec)


register_kind(AnalysisKind(
    kind="attention_patterns", label="Attention patterns", short="attention", spec=AttentionPatternsSpec,
    job=_patterns_job, dims="[layer, head, query, key]", value_name="attention", scale="sequential",
    view="attention_pattern", click="describe", figure_slice=leading_slices(),
    description="Where every head attends, query x key, from one forward pass."))

register_kind(AnalysisKind(
    kind="attention_rollout", label="Attention rollout", short="rollout", spec=AttentionRolloutSpec,
    job=_rollout_job, dims="[layer, query, key]", value_name="attention through the layers", scale="sequential",
    view="attention_pattern", click="describe", figure_slice=leading_slices(defaults={"layer": -1}),
    description="How much each position draws on each input token through all layers so far."))
