"""Direct logit attribution: each head's or sublayer's direct share of logit(answer) - logit(wrong)."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import answer_ids, prompt_field, tokens_of, with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class DirectLogitAttributionSpec(AnalysisSpec):
    prompt: str = prompt_field()
    granularity: str = param("heads", widget="choice", choices=("heads", "layers"),
                             tip="heads: [layer, head]; layers: [layer, sublayer] with attn and mlp")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dla import direct_logit_attribution_job

    answer, wrong = answer_ids(lm, prompts, need_wrong=True)
    return with_spec_params(direct_logit_attribution_job(
        lm, tokens_of(lm, prompts, spec), answer, wrong, granularity=spec.granularity, name=spec.name,
        prompt_label=spec.prompt, cancel=cancel), spec)


def _dataset_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_reading import dataset_dla_job
    from desktop_app.project.dataset_jobs import _data

    return with_spec_params(dataset_dla_job(lm, _data(lm, prompts, need_wrong=True), spec.granularity, spec.prompt,
                                            spec.name, cancel), spec)


register_kind(AnalysisKind(
    kind="direct_logit_attribution", label="Direct logit attribution", short="dla", spec=DirectLogitAttributionSpec,
    job=_job, dataset_job=_dataset_job, dims="[layer, head] (heads) or [layer, sublayer] (layers)",
    value_name="direct logit difference",
    scale="diverging", view="heatmap", click="describe",
    description="What each head or sublayer writes straight into logit(answer) - logit(wrong), through the "
                "final norm's scale."))
