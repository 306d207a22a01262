"""Token attribution: which input tokens the prediction at the last position rests on."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import (answer_ids, normalise_target, prompt_field, target_to_json,
                                               tokens_of, with_spec_params)
from desktop_app.project.specs import AnalysisSpec, param

_METHODS = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "shap", "lime")
_TARGETS = ("logit_diff", "answer_logit", "answer_prob")
_INTEGRATIONS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


@dataclass(frozen=True)
class TokenAttributionSpec(AnalysisSpec):
    method: str = param("integrated_gradients", widget="choice", choices=_METHODS, tip="The attribution method")
    prompt: str = prompt_field()
    target: str = param("logit_diff", widget="choice", choices=_TARGETS, editable=True,
                        tip="What is explained, at the last position: a built-in target or a metric expression "
                            "such as prob(answer) / prob(wrong)")
    baseline: str = param("pad", widget="choice", choices=("pad", "zero"), editable=True,
                          tip="What a removed token becomes: the pad token, the zero vector or a literal token")
    steps: int = param(50, widget="int", minimum=1, maximum=10_000, tip="Integration steps (integrated gradients)")
    integration: str = param("gausslegendre", widget="choice", choices=_INTEGRATIONS,
                             tip="Integration rule (integrated gradients)")
    samples: int = param(256, widget="int", minimum=2, maximum=1_000_000,
                         tip="Model evaluations (SHAP sampling above 12 tokens, LIME)")
    window: int = param(1, widget="int", minimum=1, maximum=1024, tip="Tokens occluded at once (occlusion)")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of SHAP / LIME sampling")

    def validate(self, where):
        normalise_target(self, where, _TARGETS, literal_tokens=False)
        super().validate(where)

    def to_dict(self):
        return target_to_json(super().to_dict(), _TARGETS, literal_tokens=False)

    def needs_wrong(self) -> bool:
        if self.target in _TARGETS:
            return self.target == "logit_diff"
        from desktop_app.engine.metric_expr import MetricExpression

        return MetricExpression(self.target).uses("wrong")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.token_attribution import token_attribution_job

    answer, wrong = answer_ids(lm, prompts, need_wrong=spec.needs_wrong())
    return with_spec_params(token_attribution_job(
        lm, tokens_of(lm, prompts, spec), answer, wrong, method=spec.method, target=spec.target,
        baseline=spec.baseline, steps=spec.steps, integration=spec.integration, samples=spec.samples,
        window=spec.window, seed=spec.seed, name=spec.name, prompt_label=spec.prompt, batch_size=batch_size,
        cancel=cancel), spec)


def _dataset_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_reading import dataset_token_attribution_job
    from desktop_app.project.dataset_jobs import _data

    return with_spec_params(dataset_token_attribution_job(
        lm, _data(lm, prompts, need_wrong=spec.needs_wrong()), spec.method, spec.target, spec.prompt, spec.name,
        batch_size=batch_size, cancel=cancel, baseline=spec.baseline, steps=spec.steps,
        integration=spec.integration, samples=spec.samples, window=spec.window, seed=spec.seed), spec)


def _name(values: dict) -> str:
    return str(values.get("method") or "token attribution").replace("_", " ")


register_kind(AnalysisKind(
    kind="token_attribution", label="Token attribution", name_for=_name, spec=TokenAttributionSpec, job=_job,
    dataset_job=_dataset_job,
    dims="[position]", value_name=lambda p: f"attribution to {p.get('target', 'logit_diff')}", scale="diverging",
    view="token_strip", click="describe",
    description="Attribute the last position's target to the input tokens (gradients, occlusion, SHAP, LIME), "
                "with a deletion curve."))
