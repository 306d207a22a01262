"""Transcoder training as a kind: per-layer transcoders (TopK or JumpReLU) trained on a local corpus and written
as a circuit-tracer set, the `transcoders` of an attribution_graph analysis. Result: the loss [layer, step],
every curve [layer, step] in extras (loss, l0, explained_variance, dead_fraction, mse, aux_loss, lr)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from desktop_app.engine.errors import SpecError
from desktop_app.project.kinds import AnalysisKind, ExportFormat, register_kind
from desktop_app.project.specs import AnalysisSpec, param

CURVES = ("loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr")


@dataclass(frozen=True)
class TranscoderTrainingSpec(AnalysisSpec):
    corpus: str = param(widget="path",
                        tip="A local .txt (paragraphs or lines) or .jsonl (a \"text\" field per line) corpus")
    out: str = param(widget="path", tip="The folder the circuit-tracer transcoder set is written to")
    architecture: str = param("topk", widget="choice", choices=("topk", "jumprelu"),
                              tip="topk: exactly k features per token; jumprelu: a learned threshold per feature "
                                  "with an L0 penalty")
    width: int = param(256, widget="int", minimum=1, maximum=1 << 20, tip="Features per layer (d_transcoder)")
    k: int = param(16, widget="int", minimum=1, maximum=1 << 16, tip="Active features per token (topk)")
    l0: float = param(1.0, widget="float", minimum=0.0, tip="L0 (sparsity) coefficient (jumprelu)")
    skip: bool = param(False, widget="bool", tip="Also train a linear skip connection W_skip (input -> output)")
    layers: tuple[int, ...] | None = param(None, widget="layers",
                                           tip="Layers to train, e.g. 0, 2 (empty: every layer); some layers "
                                               "replace those layers in the set already in the output folder")
    tokens: int = param(200_000, widget="int", minimum=2, tip="Most corpus tokens to read")
    context: int = param(128, widget="int", minimum=3, tip="Tokens per sequence (longer documents are cut)")
    steps: int = param(2000, widget="int", minimum=1, tip="Training steps")
    batch_size: int = param(512, widget="int", minimum=1, tip="Tokens per training step")
    lr: float = param(1e-3, widget="float", minimum=0.0, tip="Peak learning rate")
    buffer_tokens: int = param(16_384, widget="int", minimum=1,
                               tip="Tokens whose MLP activations are held and shuffled at a time")
    seed: int = param(0, widget="int", minimum=0, tip="Random seed (initialisation and data order)")

    def validate(self, where):
        super().validate(where)
        if not str(self.corpus).strip() or not str(self.out).strip():
            raise SpecError(f"{where}: fields 'corpus' and 'out' are needed; give a corpus file and an output folder.")
        if self.architecture == "topk" and self.k > self.width:
            raise SpecError(f"{where}: field 'k' is {self.k}, more than width {self.width}; choose k <= width.")

    def train_config(self) -> dict:
        return dict(architecture=self.architecture, d_transcoder=self.width, k=self.k, l0_coefficient=self.l0,
                    skip=self.skip, layers=None if not self.layers else tuple(self.layers), steps=self.steps,
                    batch_size=self.batch_size, lr=self.lr, buffer_tokens=self.buffer_tokens, seed=self.seed,
                    log_every=max(1, min(50, self.steps // 20)))


def _job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.transcoder_training import transcoder_training_job

    return transcoder_training_job(lm, spec.corpus, spec.train_config(), spec.out, cancel=cancel,
                                   context=spec.context, max_tokens=spec.tokens, name=spec.name,
                                   prepend_bos=prompts.prepend_bos)


def curves_csv_text(result) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    names = [c for c in CURVES if c in result.extras]
    w.writerow(["layer", "step", *names])
    for i, layer in enumerate(result.labels["layer"]):
        for j, step in enumerate(result.labels["step"]):
            w.writerow([layer, step, *(repr(float(np.asarray(result.extras[c])[i, j])) for c in names)])
    return out.getvalue()


def write_curves_csv(result, path: Path) -> Path:
    from desktop_app.project.atomic import atomic_write

    text = curves_csv_text(result).encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(text), what="CSV file")


register_kind(AnalysisKind(
    kind="transcoder_training", label="Transcoder training", short="transcoder training",
    spec=TranscoderTrainingSpec, job=_job, dims="[layer, step]", value_name="training loss", scale="sequential",
    view="heatmap", click="describe",
    exports=(ExportFormat("curves", write_curves_csv,
                          "every training curve per layer (loss, L0, explained variance, dead fraction, mse, aux, lr) "
                          "as CSV"),),
    description="Train per-layer transcoders (MLP input -> MLP output, TopK or JumpReLU) on a local corpus and write "
                "them as a circuit-tracer set for attribution graphs."))
