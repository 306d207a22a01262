"""Logit lens, tuned lens and Jacobian lens: the probability of a target token at every layer's residual stream."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.engine.errors import SpecError
from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import answer_ids, prompt_field, tokens_of, with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class LogitLensSpec(AnalysisSpec):
    lens: str = param("logit", widget="choice", choices=("logit", "tuned", "jacobian"),
                      tip="logit: final norm + unembedding of each layer; tuned: a tuned lens's translators first; "
                          "jacobian: the layer's average Jacobian to the last layer first")
    lens_path: str = param("", widget="path", empty_ok=True,
                           tip="The tuned-lens folder (config.json + params.pt) for lens = tuned, the .pt file for lens = jacobian")
    prompt: str = prompt_field()
    target: str = param("answer", widget="choice", choices=("answer", "prediction"), editable=True,
                        tip="answer, prediction (the model's own next token at each position) or a literal token")
    k: int = param(5, widget="int", minimum=1, maximum=100, tip="How many top tokens to keep per cell (hover)")
    force_hook: bool = param(False, widget="bool",
                             tip="Use the tuned lens even where its config names another model (normally refused)")

    def validate(self, where):
        super().validate(where)
        if self.lens == "tuned" and not self.lens_path:
            raise SpecError(f"{where}: lens tuned needs lens_path, the tuned-lens folder; choose it or use lens logit.")
        if self.lens == "jacobian" and not self.lens_path:
            raise SpecError(f"{where}: lens jacobian needs lens_path, the Jacobian lens .pt file; choose it (a "
                            "jacobian_lens_fitting analysis writes one) or use lens logit.")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.lenses import logit_lens_job

    tokens = tokens_of(lm, prompts, spec)
    answer = answer_ids(lm, prompts, need_wrong=False)[0] if spec.target == "answer" else None
    return with_spec_params(logit_lens_job(lm, tokens, target=spec.target, answer_id=answer, lens=spec.lens,
                                           lens_path=spec.lens_path or None, k=spec.k, name=spec.name,
                                           prompt_label=spec.prompt, cancel=cancel,
                                           force_hook=spec.force_hook), spec)


def _dataset_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.dataset_reading import dataset_logit_lens_job
    from desktop_app.project.dataset_jobs import _data

    return with_spec_params(dataset_logit_lens_job(
        lm, _data(lm, prompts, need_wrong=False), target=spec.target, lens=spec.lens,
        lens_path=spec.lens_path or None, k=spec.k, prompt=spec.prompt, name=spec.name, cancel=cancel), spec)


register_kind(AnalysisKind(
    kind="logit_lens", label="Logit lens", short="lens", spec=LogitLensSpec, job=_job, dims="[layer, position]",
    dataset_job=_dataset_job,
    value_name="target probability", scale="sequential", view="lens_grid", click="describe",
    description="Read every layer's residual stream through the final norm and unembedding (or a tuned or "
                "Jacobian lens)."))
