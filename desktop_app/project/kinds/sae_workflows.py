"""SAE workflows as kinds: sae_training, sae_dashboards, sae_edit, sae_metrics (contract section 6.3).

Each job factory calls the engine job of engine/sae with the spec's fields and, where the engine's result is
shaped for the window's panes, reshapes it for the project: training curves become values [step] (the loss)
with every curve in extras; dashboards become values [feature] (densities) with the dashboards as JSON in
extras. Paths (sae, corpus, out) in an experiment file are relative to it (project/experiment.py).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from desktop_app.engine.errors import SpecError
from desktop_app.project.kinds import AnalysisKind, ExportFormat, prompt_text, register_kind
from desktop_app.project.kinds import _sae_exports as ex
from desktop_app.project.specs import AnalysisSpec, param

_SAE_TIP = "SAELens folder, Gemma Scope params.npz or a .safetensors file"
_HOOK_TIP = "The hook point the SAE reads (needed when its file names none)"
_FORCE_TIP = "Apply the SAE even where its file names another hook or model (normally refused)"
_CORPUS_TIP = "A local .txt (paragraphs or lines) or .jsonl (a \"text\" field per line) corpus"
TRAIN_ARCHITECTURES = {"topk": "topk", "batchtopk": "batchtopk", "relu_l1": "standard", "jumprelu": "jumprelu"}


def _need_hook(spec, where: str) -> None:
    if spec.hook is None:
        raise SpecError(f"{where}: field 'hook' is needed; give the hook point to train on, e.g. "
                        "blocks.0.hook_resid_post.")


# ---- sae_training ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SAETrainingSpec(AnalysisSpec):
    corpus: str = param(widget="path", tip=_CORPUS_TIP)
    out: str = param(widget="path", tip="The folder the SAELens SAE (and its checkpoints) is written to")
    hook: str | None = param(None, widget="hook", tip="The hook point whose activations the SAE learns")
    architecture: str = param("topk", widget="choice", choices=tuple(TRAIN_ARCHITECTURES),
                              tip="topk, batchtopk, relu_l1 (ReLU + L1 penalty) or jumprelu")
    width: int = param(256, widget="int", minimum=1, maximum=1 << 22, tip="Number of SAE features (d_sae)")
    k: int = param(16, widget="int", minimum=1, maximum=1 << 16, tip="Active features per token (topk, batchtopk)")
    l1: float = param(5.0, widget="float", minimum=0.0, tip="L1 coefficient (relu_l1)")
    l0: float = param(1.0, widget="float", minimum=0.0, tip="L0 coefficient (jumprelu)")
    tokens: int = param(200_000, widget="int", minimum=2, tip="Most corpus tokens to collect activations for")
    context: int = param(128, widget="int", minimum=2, tip="Tokens per sequence (longer documents are cut)")
    steps: int = param(2000, widget="int", minimum=1, tip="Training steps")
    batch_size: int = param(1024, widget="int", minimum=1, tip="Activations per training step")
    lr: float = param(1e-3, widget="float", minimum=0.0, tip="Peak learning rate")
    lr_warmup_steps: int = param(0, widget="int", minimum=0, tip="Linear learning-rate warm-up steps")
    checkpoint_every: int = param(0, widget="int", minimum=0, tip="Save a checkpoint every N steps (0: on cancel only)")
    resume: bool = param(False, widget="bool", tip="Continue from the newest checkpoint in out/checkpoints")
    cache: bool = param(True, widget="bool", tip="Keep the activations in the on-disk cache for later runs")
    seed: int = param(0, widget="int", minimum=0, tip="Random seed (initialisation and data order)")

    def validate(self, where):
        super().validate(where)
        _need_hook(self, where)
        if self.architecture in ("topk", "batchtopk") and self.k > self.width:
            raise SpecError(f"{where}: field 'k' is {self.k}, more than width {self.width}; choose k <= width.")

    def train_config(self) -> dict:
        return dict(architecture=TRAIN_ARCHITECTURES[self.architecture], d_sae=self.width, k=self.k,
                    l1_coefficient=self.l1, l0_coefficient=self.l0, steps=self.steps, batch_size=self.batch_size,
                    lr=self.lr, lr_warmup_steps=self.lr_warmup_steps, checkpoint_every=self.checkpoint_every,
                    seed=self.seed, log_every=max(1, min(50, self.steps // 20)))


def training_curves(result, name: str | None = None):
    """The engine's [step, metric] training result as the kind's result: values [step] (loss), every curve
    [step] in extras (loss, l0, explained_variance, dead_fraction, mse, aux_loss, lr)."""
    import numpy as np

    metrics = list(result.labels["metric"])
    curves = {m: np.asarray(result.values[:, i], dtype=np.float32) for i, m in enumerate(metrics)}
    return dataclasses.replace(result, name=name or result.name, kind="sae_training", dims=["step"],
                               values=curves["loss"], labels={"step": list(result.labels["step"])},
                               extras={**result.extras, **curves})


def _training_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.sae.checkpoints import checkpoint_folders
    from desktop_app.engine.sae.jobs import sae_training_job

    ckpt = Path(spec.out) / "checkpoints"
    resume_from = ckpt if spec.resume and checkpoint_folders(ckpt) else None

    def job():
        result = yield from sae_training_job(
            lm, spec.hook, spec.corpus, spec.train_config(), spec.out, cancel=cancel, context=spec.context,
            max_tokens=spec.tokens, name=spec.name, cache_dir=None if spec.cache else False,
            batch_size=batch_size or 16, resume_from=resume_from)
        return training_curves(result, spec.name)
    return job()


# ---- sae_dashboards --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SAEDashboardsSpec(AnalysisSpec):
    sae: str = param(widget="path", tip=_SAE_TIP)
    corpus: str = param(widget="path", tip=_CORPUS_TIP)
    hook: str | None = param(None, widget="hook", tip=_HOOK_TIP)
    features: tuple[int, ...] | None = param(None, widget="layers",
                                             tip="Feature numbers, e.g. 0, 12, 40 (empty: the top N by density)")
    top_n: int = param(20, widget="int", minimum=1, tip="With no features listed: how many of the densest to show")
    n_top: int = param(10, widget="int", minimum=1, maximum=1000, tip="Top activating contexts per feature")
    window: int = param(8, widget="int", minimum=0, maximum=256, tip="Tokens shown on each side of a context's peak")
    context: int = param(128, widget="int", minimum=2, tip="Tokens per sequence (longer documents are cut)")
    tokens: int = param(200_000, widget="int", minimum=1, tip="Most corpus tokens to scan")
    force_hook: bool = param(False, widget="bool", tip=_FORCE_TIP)


def _dashboards_job(lm, prompts, spec, cancel, batch_size):
    import time

    import numpy as np

    from desktop_app.engine.results import AnalysisResult
    from desktop_app.engine.sae.dashboards import build_dashboards_job, dashboards_to_list

    def job():
        t0 = time.perf_counter()
        dashboards = yield from build_dashboards_job(
            lm, spec.sae, spec.corpus, features=spec.features, n_top=spec.n_top, context=spec.window,
            cancel=cancel, batch_size=batch_size or 16, seq_len=spec.context, max_tokens=spec.tokens,
            hook=spec.hook, force_hook=spec.force_hook)
        if spec.features is None:
            dashboards = sorted(dashboards, key=lambda d: (-d.density, d.feature))[:spec.top_n]
        items = dashboards_to_list(dashboards)
        from desktop_app.engine.sae.jobs import cached_load_sae, trust_params
        sae = cached_load_sae(spec.sae, spec.hook)
        params = dict(sae=spec.sae, hook=spec.hook or sae.cfg.hook_name, corpus=spec.corpus,
                      features=None if spec.features is None else list(spec.features), top_n=spec.top_n,
                      n_tokens=int(dashboards[0].n_tokens) if dashboards else 0, **trust_params(sae, spec.force_hook))
        return AnalysisResult(
            name=spec.name, kind="sae_dashboards", params=params, dims=["feature"],
            values=np.array([d.density for d in dashboards], dtype=np.float32),
            labels={"feature": [str(d.feature) for d in dashboards]}, elapsed_s=time.perf_counter() - t0,
            extras={"max_activation": np.array([d.max_activation for d in dashboards], dtype=np.float32),
                    "dashboards_json": np.array(json.dumps(items, ensure_ascii=False))})
    return job()


# ---- sae_edit --------------------------------------------------------------------------------------------

def _edit_text(item, where: str) -> str:
    """One edit as canonical JSON text: {"feature": int, "op": ablate|clamp|steer, "value": float,
    "positions": [int] | null}; accepts an object or its JSON text (the panel's lines)."""
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except json.JSONDecodeError:
            raise SpecError(f"{where}: field 'edits' has {item!r}, which is not a JSON object like "
                            "{\"feature\": 3, \"op\": \"clamp\", \"value\": 5}.") from None
    if not isinstance(item, dict) or set(item) - {"feature", "op", "mode", "value", "positions"}:
        raise SpecError(f"{where}: field 'edits' needs objects with feature, op, value and positions, not {item!r}.")
    feature, op = item.get("feature"), item.get("op", item.get("mode", "ablate"))
    value, positions = item.get("value", 0.0), item.get("positions")
    if isinstance(feature, bool) or not isinstance(feature, int) or feature < 0:
        raise SpecError(f"{where}: an edit's 'feature' must be a feature number >= 0, not {feature!r}.")
    if op not in ("ablate", "clamp", "steer"):
        raise SpecError(f"{where}: an edit's 'op' is {op!r}; use ablate, clamp or steer.")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"{where}: an edit's 'value' must be a number, not {value!r}.")
    if positions is not None and (not isinstance(positions, list) or not all(
            isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in positions)):
        raise SpecError(f"{where}: an edit's 'positions' must be a list of token positions or null, not {positions!r}.")
    return json.dumps({"feature": feature, "op": op, "value": float(value), "positions": positions})


@dataclass(frozen=True)
class SAEEditSpec(AnalysisSpec):
    sae: str = param(widget="path", tip=_SAE_TIP)
    edits: tuple = param((), widget="text_list",
                         tip='One edit per line: {"feature": 3, "op": "clamp", "value": 5, "positions": null}')
    prompt: str = param("clean", widget="choice", choices=("clean", "corrupted"), editable=True,
                        tip="clean, corrupted, or a literal text")
    hook: str | None = param(None, widget="hook", tip=_HOOK_TIP)
    keep_error: bool = param(True, widget="bool", tip="Add the SAE's error term back, so no edit changes nothing")
    n_continue: int = param(20, widget="int", minimum=0, maximum=1000, tip="Greedy continuation tokens")
    top_n: int = param(10, widget="int", minimum=1, maximum=1000, tip="Most probable next tokens shown")
    force_hook: bool = param(False, widget="bool", tip=_FORCE_TIP)

    def validate(self, where):
        edits = self.edits
        if isinstance(edits, (str, bytes, dict)) or not hasattr(edits, "__iter__"):
            raise SpecError(f"{where}: field 'edits' must be a list of edit objects, not {edits!r}.")
        object.__setattr__(self, "edits", tuple(_edit_text(e, where) for e in edits))
        super().validate(where)

    def edit_list(self) -> list[dict]:
        return [json.loads(e) for e in self.edits]

    def to_dict(self):
        d = super().to_dict()
        d["edits"] = self.edit_list()  # objects in experiment and project files, as the contract writes them
        return d


def _edit_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.sae.jobs import sae_intervention_job

    edits = [{"feature": e["feature"], "mode": e["op"], "value": e["value"], "positions": e["positions"]}
             for e in spec.edit_list()]

    def job():
        result = yield from sae_intervention_job(
            lm, spec.sae, prompt_text(prompts, spec.prompt), edits, keep_error=spec.keep_error,
            n_continue=spec.n_continue, cancel=cancel, hook=spec.hook, name=spec.name, top_n=spec.top_n,
            prepend_bos=prompts.prepend_bos, force_hook=spec.force_hook)
        shown = lm.tokens_of_ids([int(i) for i in result.tokens_clean]).display
        return edit_result(result, [f"{i}: {t}" for i, t in enumerate(shown)], spec.prompt)
    return job()


def edit_result(result, position_labels: list[str], prompt: str):
    """The engine's intervention result as the contract's sae_edit result: values [position, vocab_top_k] = the
    after-edit probabilities of each position's k most probable after-edit tokens; extras `probs_before` /
    `probs_after` [position, vocab_top_k], `top_token_ids` / `top_tokens` [position, vocab_top_k], `kl`
    [position] = KL(before || after), the continuations; the engine's last-position view as `last_*`."""
    ex = result.extras
    k = ex["position_probs_after"].shape[1]
    extras = {"probs_before": ex["position_probs_before"], "probs_after": ex["position_probs_after"],
              "top_token_ids": ex["position_top_ids"], "top_tokens": ex["position_top_tokens"],
              "kl": ex["position_kl"], "continuation": ex["continuation"],
              "continuation_before_ids": ex["continuation_before_ids"],
              "continuation_after_ids": ex["continuation_after_ids"],
              "last_probs": np.asarray(result.values, dtype=np.float32), "last_top_token_ids": ex["top_token_ids"],
              "last_top_tokens": ex["top_tokens"]}
    return dataclasses.replace(
        result, kind="sae_edit", dims=["position", "vocab_top_k"], values=ex["position_probs_after"].copy(),
        labels={"position": list(position_labels), "vocab_top_k": [str(r + 1) for r in range(k)]},
        params={**result.params, "prompt": prompt}, extras=extras)


def edit_details(result, where: dict) -> str:
    """A click on (position, rank): the token, its probability before -> after, the position's KL."""
    i, r = int(where.get("position", 0)), int(where.get("vocab_top_k", 0))
    ex = result.extras
    token = str(np.asarray(ex["top_tokens"])[i, r])
    before, after = float(np.asarray(ex["probs_before"])[i, r]), float(np.asarray(ex["probs_after"])[i, r])
    cont = [str(c) for c in np.asarray(ex.get("continuation", ["", ""])).tolist()]
    return (f"{result.labels['position'][i]}, rank {r + 1} after the edit: {token!r}\n"
            f"probability before {before:.4g} -> after {after:.4g}\n"
            f"KL(before || after) at this position: {float(np.asarray(ex['kl'])[i]):.4g}\n"
            f"continuation before: {cont[0]!r}\ncontinuation after: {cont[-1]!r}")


# ---- sae_metrics -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SAEMetricsSpec(AnalysisSpec):
    sae: str = param(widget="path", tip=_SAE_TIP)
    corpus: str = param(widget="path", tip=_CORPUS_TIP)
    hook: str | None = param(None, widget="hook", tip=_HOOK_TIP)
    max_texts: int = param(200, widget="int", minimum=1, tip="Most corpus documents to evaluate on")
    force_hook: bool = param(False, widget="bool", tip=_FORCE_TIP)


def _metrics_job(lm, prompts, spec, cancel, batch_size):
    from desktop_app.engine.sae.corpus import read_corpus
    from desktop_app.engine.sae.jobs import sae_metrics_job

    texts = read_corpus(spec.corpus, max_texts=spec.max_texts)

    def job():
        result = yield from sae_metrics_job(lm, spec.sae, texts, cancel=cancel, hook=spec.hook, name=spec.name,
                                            prepend_bos=prompts.prepend_bos, force_hook=spec.force_hook)
        result.params.update(sae=spec.sae, corpus=spec.corpus)
        return result
    return job()


# ---- registration ----------------------------------------------------------------------------------------

register_kind(AnalysisKind(
    kind="sae_training", label="SAE training", short="sae training", spec=SAETrainingSpec, job=_training_job,
    dims="[step]", value_name="training loss", scale="sequential", view="line", click="describe",
    exports=(ExportFormat("curves", ex.write_curves_csv,
                          "every training curve (loss, L0, explained variance, dead fraction, mse, aux, lr) as CSV"),),
    description="Train a sparse autoencoder at a hook point on a local corpus and write it as an SAELens folder."))

register_kind(AnalysisKind(
    kind="sae_dashboards", label="SAE dashboards", short="sae dashboards", spec=SAEDashboardsSpec,
    job=_dashboards_job, dims="[feature]", value_name="feature density", scale="sequential", view="bars",
    click="describe",
    exports=(ExportFormat("html", ex.write_dashboards_html, "feature dashboards as one self-contained HTML page"),
             ExportFormat("json", ex.write_dashboards_json, "feature dashboards as JSON")),
    description="Top activating contexts, densities, histograms and output tokens of SAE features over a corpus."))

register_kind(AnalysisKind(
    kind="sae_edit", label="SAE feature edit", short="sae edit", spec=SAEEditSpec, job=_edit_job,
    dims="[position, vocab_top_k]", value_name="next-token probability after the edit", scale="sequential",
    view="heatmap", click="details", details=edit_details,
    exports=(ExportFormat("json", ex.write_edit_json,
                          "per position: top tokens with probabilities before / after, KL, and the continuations"),),
    description="Ablate, clamp or steer SAE features and compare next-token probabilities and continuations."))

register_kind(AnalysisKind(
    kind="sae_metrics", label="SAE metrics", short="sae metrics", spec=SAEMetricsSpec, job=_metrics_job,
    dims="[metric]", value_name="value", scale="sequential", view="bars", click="describe",
    description="L0, explained variance, CE loss with the SAE spliced in (and recovered), KL, over a corpus."))
