"""Training a tuned lens on a text corpus of the user's (small models, CPU), saved as a tuned-lens folder."""
from __future__ import annotations

from dataclasses import dataclass

from desktop_app.project.kinds import AnalysisKind, register_kind
from desktop_app.project.kinds._reading import with_spec_params
from desktop_app.project.specs import AnalysisSpec, param


@dataclass(frozen=True)
class TunedLensTrainingSpec(AnalysisSpec):
    corpus: str = param(widget="path", tip="A .txt (paragraphs or lines) or .jsonl (\"text\") file to train on")
    out: str = param(widget="path", tip="The folder to write the tuned lens to (config.json + params.pt)")
    steps: int = param(200, widget="int", minimum=1, maximum=1_000_000, tip="Optimiser steps")
    context: int = param(64, widget="int", minimum=2, maximum=100_000, tip="Tokens per text (longer texts are cut)")
    batch_size: int = param(8, widget="int", minimum=1, maximum=4096, tip="Texts per step")
    lr: float = param(1e-3, widget="float", minimum=0.0, maximum=1.0, step=1e-4, tip="Adam learning rate")
    seed: int = param(0, widget="int", minimum=0, maximum=2**31 - 1, tip="Seed of the text sampling")


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.tuned_lens import train_tuned_lens_job

    return with_spec_params(train_tuned_lens_job(lm, spec.corpus, spec.out, steps=spec.steps, context=spec.context,
                                                 batch_size=spec.batch_size, lr=spec.lr, seed=spec.seed,
                                                 name=spec.name, cancel=cancel), spec)


register_kind(AnalysisKind(
    kind="tuned_lens_training", label="Tuned lens training", short="tuned lens", spec=TunedLensTrainingSpec,
    job=_job, dims="[step]", value_name="KL(model || lens), summed over layers", scale="sequential", view="line",
    click="describe",
    description="Fit one affine translator per layer so each layer's lens matches the model's final distribution; "
                "use the folder as lens_path of a logit_lens analysis."))
