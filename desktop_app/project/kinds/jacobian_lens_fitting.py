"""Fitting a Jacobian lens on a text corpus of the user's (small models, CPU), saved as a .pt file."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class JacobianLensFittingSpec(AnalysisSpec):
    corpus: str = param(widget="path", tip="A .txt (paragraphs or lines) or .jsonl (\"text\") file to fit on")
    out: str = param(widget="path", tip="The .pt file to write the Jacobian lens to")
    n_prompts: int = param(100, widget="int", minimum=1, maximum=1_000_000, tip="How many texts to average over")
    context: int = param(64, widget="int", minimum=2, maximum=100_000, tip="Tokens per text (longer texts are cut)")
    skip_first: int = param(16, widget="int", minimum=0, maximum=100_000,
                            tip="Source positions before this one are left out of the average (attention sinks)")
    dim_batch: int = param(64, widget="int", minimum=1, maximum=65_536,
                           tip="Output dimensions per backward pass (the prompt is replicated this many times)")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.jacobian_lens import fit_jacobian_lens_job

    return with_spec_params(fit_jacobian_lens_job(lm, spec.corpus, spec.out, n_prompts=spec.n_prompts,
                                                  context=spec.context, skip_first=spec.skip_first,
                                                  dim_batch=spec.dim_batch, name=spec.name, cancel=cancel), spec)


register_kind(AnalysisKind(
    kind="jacobian_lens_fitting", label="Jacobian lens fitting", short="J-lens", spec=JacobianLensFittingSpec,
    job=_job, dims="[layer]", value_name="mean |J - I| entry", scale="sequential", view="line", click="describe",
    description="Average each layer's Jacobian of the last layer's residual over a corpus; use the file as "
                "lens_path of a logit_lens analysis with lens jacobian."))
