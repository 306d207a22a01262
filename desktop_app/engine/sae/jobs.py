"""SAE analyses as engine jobs (generators yielding Progress / Partial, returning an AnalysisResult).

    sae_features_job          feature activations [position, feature] of one prompt (the `sae_features` kind)
    sae_metrics_job           L0, explained variance, CE loss clean / spliced / zero-ablated, recovered, KL
    sae_intervention_job      next-token distribution and greedy continuation before / after feature edits
    sae_feature_patching_job  patch each feature clean -> corrupted, logit_diff_recovered per feature
    sae_training_job          collect activations over a local corpus, train, write an SAELens folder

Every result is numpy only (strings as unicode arrays, never object arrays) so the project file keeps it.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks, run_with_cache
from desktop_app.engine.edits import greedy_continuation
from desktop_app.engine.conformance import require_for_hook
from desktop_app.engine.errors import SAEError
from desktop_app.engine.hooknames import parse_hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.memory import RowBudget, chunks_shrinking_on_oom, rows_per_batch
from desktop_app.engine.metrics import MetricContext
from desktop_app.engine.results import AnalysisResult, empty_values
from desktop_app.engine.sae import corpus as corpus_mod
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.inspect import (FeatureEdit, ce_loss_with_sae, edit_hook, feature_table, fitted_hook,
                                           run_sae)
from desktop_app.engine.sae.metrics import explained_variance
from desktop_app.engine.sae.model import SAE
from desktop_app.engine.sae.training import TrainConfig, train_sae

# ---- loading, with a small cache so that the window can re-run cheaply ----------------------------------------

_CACHE: dict[tuple, SAE] = {}
_CACHE_SIZE = 4


def _mtime(p: Path) -> float:
    if p.is_dir():
        return max((f.stat().st_mtime for f in p.iterdir() if f.is_file()), default=p.stat().st_mtime)
    return p.stat().st_mtime


def cached_load_sae(path, hook: str | None = None) -> SAE:
    """load_sae, remembered by (path, modification time, hook): a changed file is read again."""
    p = Path(path).expanduser().resolve()
    if not p.exists():
        return load_sae(p, hook)  # raises the one-sentence SAEError
    key = (str(p), _mtime(p), hook)
    if key not in _CACHE:
        while len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = load_sae(p, hook)
    return _CACHE[key]


def _as_sae(sae_or_path, hook: str | None = None) -> SAE:
    return sae_or_path if isinstance(sae_or_path, SAE) else cached_load_sae(sae_or_path, hook)


def trusted_sae(lm, sae: SAE, hook: str | None, force_hook: bool) -> tuple[SAE, str]:
    """(the SAE to use, the hook): with force_hook, a shallow copy (weights shared) whose config names the hook
    it is applied at and no model, so that the engine's own checks further in accept it."""
    hook = fitted_hook(lm, sae, hook, force_hook)
    if not force_hook:
        return sae, hook
    other = copy.copy(sae)
    meta = {k: v for k, v in sae.cfg.metadata.items() if k not in ("model_name", "model_fingerprint")}
    other.cfg = dataclasses.replace(sae.cfg, hook_name=hook, metadata=meta)
    return other, hook


def trust_params(sae: SAE, force_hook: bool) -> dict:
    """What a result records about how far its SAE was trusted: settings assumed, a forced hook."""
    out = {}
    if sae.cfg.assumptions:
        out["assumptions"] = list(sae.cfg.assumptions)
    if force_hook:
        out["force_hook"] = True
    return out


def _tokens(lm, text_or_ids, prepend_bos=None):
    if isinstance(text_or_ids, str):
        return lm.tokenize(text_or_ids, prepend_bos)
    ids = [int(i) for i in torch.as_tensor(text_or_ids).reshape(-1).tolist()]
    return lm.tokens_of_ids(ids)


def _flat(sae: SAE, x: torch.Tensor) -> torch.Tensor:
    """Hook activations as [..., d_in] (hook_z heads flattened)."""
    return x.reshape(*x.shape[:-2], sae.d_in) if x.shape[-1] != sae.d_in else x


# ---- sae_features ------------------------------------------------------------------------------------------

def sae_features_job(lm, text_or_ids=None, sae_path=None, hook: str | None = None, top_k: int = 10,
                     name: str = "sae", cancel: CancelToken | None = None, prompt_label: str = "clean", *,
                     text: str | None = None, prepend_bos: bool | None = None, force_hook: bool = False):
    """The `sae_features` analysis: values [position, feature] of the features in labels["feature"]."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    source = text_or_ids if text_or_ids is not None else text
    if source is None or sae_path is None:
        raise SAEError("The SAE features analysis needs a prompt and an SAE path; give both.")
    if int(top_k) < 0:
        raise SAEError(f"top_k must be 0 (all features) or a positive number, not {top_k}.")
    tokens = _tokens(lm, source, prepend_bos)
    sae = _as_sae(sae_path, hook)
    sae, hook = trusted_sae(lm, sae, hook, force_hook)
    require_for_hook(lm, hook, f"SAE features at {hook}", restarts=False)
    yield Progress(0, 2, f"running the model to {hook}")
    _, cache = run_with_cache(lm, [tokens.ids], [hook], cancel=cancel)
    yield Progress(1, 2, "encoding with the SAE")
    with torch.inference_mode():
        x = _flat(sae, cache[hook][0].float())
        x_hat, f = sae.to("cpu")(x)
        f = f.float()
        err = (x - x_hat.float()).pow(2).sum(-1)
        l0 = (f != 0).sum(-1).float()
    values, chosen = feature_table(f, int(top_k))
    values = values.numpy().astype(np.float32)
    result = AnalysisResult(
        name=name, kind="sae_features",
        params=dict(sae=str(sae_path if not isinstance(sae_path, SAE) else getattr(sae, "source_path", "")),
                    hook=hook, prompt=prompt_label, top_k=int(top_k), **trust_params(sae, force_hook)),
        dims=["position", "feature"], values=values,
        labels={"position": tokens.labels(), "feature": [str(i) for i in chosen]},
        tokens_clean=np.array(tokens.ids, dtype=np.int64),
        extras={"reconstruction_error": err.numpy().astype(np.float32), "l0": l0.numpy().astype(np.float32)})
    yield Partial(index=np.indices(values.shape, sparse=True), values=values)
    yield Progress(2, 2, "done")
    result.elapsed_s = time.perf_counter() - t0
    return result


# ---- metrics -----------------------------------------------------------------------------------------------

METRIC_NAMES = ("l0", "explained_variance", "ce_clean", "ce_spliced", "ce_zero_ablated", "ce_recovered",
                "kl_spliced")


def sae_metrics_job(lm, sae, texts, cancel: CancelToken | None = None, hook: str | None = None,
                    name: str = "sae_metrics", prepend_bos: bool | None = None, force_hook: bool = False):
    """Token-weighted means over `texts` (a string or a list of strings); values [metric]."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise SAEError("The SAE metrics need at least one text; give a prompt or a corpus.")
    sae = _as_sae(sae, hook)
    sae, hook = trusted_sae(lm, sae, hook, force_hook)
    require_for_hook(lm, hook, f"SAE metrics at {hook}", restarts=False)
    sums = dict.fromkeys(("l0", "ce_clean", "ce_spliced", "ce_zero_ablated", "kl_spliced"), 0.0)
    xs, x_hats = [], []
    n_tok = n_next = 0
    for i, text in enumerate(texts):
        yield Progress(i, len(texts), f"text {i + 1} of {len(texts)}")
        ids = as_ids(_tokens(lm, text, prepend_bos).ids)
        n = ids.shape[1]
        logits, cache = run_with_cache(lm, ids, [hook], cancel=cancel)
        with torch.inference_mode():
            x = _flat(sae, cache[hook][0].float())
            x_hat, f = sae.to("cpu")(x)
            xs.append(x)
            x_hats.append(x_hat.float())
            sums["l0"] += float((f != 0).sum())
            with hooks(lm, write={hook: lambda a: run_sae(sae, a)[0]}, cancel=cancel):
                spliced = forward_logits(lm, ids)[0].float().cpu()
            ref = torch.log_softmax(logits[0], -1)
            kl = (ref.exp() * (ref - torch.log_softmax(spliced, -1))).sum(-1)
            sums["kl_spliced"] += float(kl.sum())
        n_tok += n
        if n >= 2:
            ce = ce_loss_with_sae(lm, sae, ids, hook, cancel)
            for key, src in (("ce_clean", "clean"), ("ce_spliced", "spliced"), ("ce_zero_ablated", "zero_ablated")):
                sums[key] += ce[src] * (n - 1)
            n_next += n - 1
    out = {"l0": sums["l0"] / n_tok, "kl_spliced": sums["kl_spliced"] / n_tok,
           "explained_variance": explained_variance(torch.cat(xs), torch.cat(x_hats))}
    for key in ("ce_clean", "ce_spliced", "ce_zero_ablated"):
        out[key] = sums[key] / n_next if n_next else float("nan")
    denom = out["ce_zero_ablated"] - out["ce_clean"]
    out["ce_recovered"] = (out["ce_zero_ablated"] - out["ce_spliced"]) / denom if abs(denom) > 1e-12 else float("nan")
    yield Progress(len(texts), len(texts), "done")
    return AnalysisResult(
        name=name, kind="sae_metrics",
        params=dict(hook=hook, n_texts=len(texts), n_tokens=n_tok, **trust_params(sae, force_hook)),
        dims=["metric"], values=np.array([out[k] for k in METRIC_NAMES], dtype=np.float32),
        labels={"metric": list(METRIC_NAMES)}, elapsed_s=time.perf_counter() - t0)


def metrics_dict(result: AnalysisResult) -> dict[str, float]:
    return {k: float(v) for k, v in zip(result.labels["metric"], result.values)}


# ---- interventions -----------------------------------------------------------------------------------------

def _as_edits(edits) -> list[FeatureEdit]:
    return [e if isinstance(e, FeatureEdit) else FeatureEdit(**e) for e in (edits or [])]


def sae_intervention_job(lm, sae, text, edits, keep_error: bool = True, n_continue: int = 20,
                         cancel: CancelToken | None = None, hook: str | None = None,
                         name: str = "sae_intervention", top_n: int = 10, prepend_bos: bool | None = None,
                         force_hook: bool = False):
    """values [which (before, after), rank] = probabilities of each distribution's top tokens; extras hold the
    token ids / strings, the KL(before || after) and the greedy continuations."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    edits = _as_edits(edits)
    sae = _as_sae(sae, hook)
    sae, hook = trusted_sae(lm, sae, hook, force_hook)
    require_for_hook(lm, hook, f"SAE interventions at {hook}", restarts=False)
    tokens = _tokens(lm, text, prepend_bos)
    ids = as_ids(tokens.ids)
    write = edit_hook(sae, edits, keep_error)
    total = 2 + 2 * max(0, int(n_continue))
    yield Progress(0, total, "next-token distributions")
    with torch.inference_mode():
        before_all = forward_logits(lm, ids)[0].float().cpu()
        with hooks(lm, write={hook: write}, cancel=cancel):
            after_all = forward_logits(lm, ids)[0].float().cpu()
        before, after = before_all[-1], after_all[-1]
        p_before, p_after = torch.softmax(before, -1), torch.softmax(after, -1)
        kl = float((p_before * (torch.log_softmax(before, -1) - torch.log_softmax(after, -1))).sum())
        k = min(int(top_n), p_before.shape[0])
        top = [torch.topk(p, k) for p in (p_before, p_after)]
        per_position = _per_position_edit(lm, before_all, after_all, k)
        yield Progress(2, total, "greedy continuation before the edit")
        cont_before = greedy_continuation(lm, ids, n_continue, None, cancel, before)
        yield Progress(2 + int(n_continue), total, "greedy continuation after the edit")
        cont_after = greedy_continuation(lm, ids, n_continue, {hook: write}, cancel, after)
    top_ids = np.stack([t.indices.numpy() for t in top]).astype(np.int64)
    top_strings = np.array([lm.tokens_of_ids(row).display for row in top_ids.tolist()], dtype=str)
    decode = lm.tokenizer.decode
    yield Progress(total, total, "done")
    return AnalysisResult(
        name=name, kind="sae_intervention",
        params=dict(sae=str(getattr(sae, "source_path", "")), hook=hook, keep_error=bool(keep_error),
                    n_continue=int(n_continue), edits=[dataclasses.asdict(e) | {
                        "positions": None if e.positions is None else [int(p) for p in e.positions]}
                        for e in edits], **trust_params(sae, force_hook)),
        dims=["which", "rank"], values=np.stack([t.values.numpy() for t in top]).astype(np.float32),
        labels={"which": ["before", "after"], "rank": [str(r + 1) for r in range(k)]},
        tokens_clean=np.array(tokens.ids, dtype=np.int64),
        elapsed_s=time.perf_counter() - t0,
        extras={"top_token_ids": top_ids, "top_tokens": top_strings, "kl": np.array(kl, dtype=np.float32),
                "continuation": np.array([decode(cont_before), decode(cont_after)], dtype=str),
                "continuation_before_ids": np.array(cont_before, dtype=np.int64),
                "continuation_after_ids": np.array(cont_after, dtype=np.int64), **per_position})


def _per_position_edit(lm, before: torch.Tensor, after: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """From logits [position, vocab] before / after an edit: at each position the k most probable tokens after
    the edit (`position_top_ids`, `position_top_tokens`), their probabilities before and after
    (`position_probs_before`, `position_probs_after`) and KL(before || after) (`position_kl`)."""
    lp_before, lp_after = torch.log_softmax(before, -1), torch.log_softmax(after, -1)
    kl = (lp_before.exp() * (lp_before - lp_after)).sum(-1)
    p_after, top_ids = torch.topk(lp_after.exp(), k, dim=-1)
    p_before = lp_before.exp().gather(-1, top_ids)
    strings = [lm.tokens_of_ids(row).display for row in top_ids.tolist()]
    return {"position_top_ids": top_ids.numpy().astype(np.int64), "position_top_tokens": np.array(strings, dtype=str),
            "position_probs_before": p_before.numpy().astype(np.float32),
            "position_probs_after": p_after.numpy().astype(np.float32),
            "position_kl": kl.numpy().astype(np.float32)}


# ---- feature patching --------------------------------------------------------------------------------------

def _decoder_directions(sae: SAE, features: list[int]) -> torch.Tensor:
    """What adding 1 to each feature adds to the hook's (flat) activation: decode(e_i) - decode(0), [n, d_in]."""
    onehot = torch.zeros(len(features), sae.d_sae, dtype=sae.dtype, device=sae.device)
    onehot[torch.arange(len(features)), torch.tensor(features, dtype=torch.long)] = 1.0
    return (sae.decode(onehot) - sae.decode(torch.zeros_like(onehot[:1]))).float()


def sae_feature_patching_job(lm, pair, sae, cancel: CancelToken | None = None, batch_size: int | None = None,
                             hook: str | None = None, positions: str = "all", name: str = "sae_feature_patching",
                             metric: str = "logit_diff_recovered", force_hook: bool = False):
    """Run the corrupted prompt with one feature's activations set to the clean run's (all positions, or one
    position at a time with positions="each"), keeping the corrupted run's SAE error term. Features: those
    active in either run at any position. dims ["feature"] or ["position", "feature"]."""
    from desktop_app.engine.replay import record_run, run_from_layer

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if positions not in ("all", "each"):
        raise SAEError(f"positions must be 'all' or 'each', not {positions!r}.")
    sae = _as_sae(sae, hook)
    sae, hook = trusted_sae(lm, sae, hook, force_hook)
    layer, kind = parse_hook_name(hook)
    require_for_hook(lm, hook, f"SAE feature patching at {hook}")
    yield Progress(0, 1, "recording the clean and corrupted runs")
    with torch.inference_mode():
        clean = record_run(lm, pair.clean.ids, [hook], cancel)
        corrupted = record_run(lm, pair.corrupted.ids, [hook], cancel)
        sae.to("cpu")
        f_clean = sae.encode(_flat(sae, _recorded(clean, hook, layer, kind)[0].float().cpu()))
        f_corr = sae.encode(_flat(sae, _recorded(corrupted, hook, layer, kind)[0].float().cpu()))
    features = ((f_clean != 0).any(0) | (f_corr != 0).any(0)).nonzero().flatten().tolist()
    ctx = MetricContext(metric, pair.answer_id, pair.wrong_id, clean.logits_last, corrupted.logits_last)
    n_pos = pair.n_pos
    per_pos = positions == "each"
    dims = ["position", "feature"] if per_pos else ["feature"]
    values = empty_values((n_pos, len(features)) if per_pos else (len(features),))
    cells = [(p, j) for p in range(n_pos) for j in range(len(features))] if per_pos else \
        [(-1, j) for j in range(len(features))]
    result = AnalysisResult(
        name=name, kind="sae_feature_patching",
        params=dict(sae=str(getattr(sae, "source_path", "")), hook=hook, positions=positions, metric=metric,
                    **trust_params(sae, force_hook)),
        dims=dims, values=values,
        labels={"feature": [str(i) for i in features], **({"position": pair.clean.labels()} if per_pos else {})},
        tokens_clean=np.array(pair.clean.ids), tokens_corrupted=np.array(pair.corrupted.ids),
        clean_metric=ctx.clean_value, corrupted_metric=ctx.corrupted_value, message=ctx.warning,
        extras={"clean_max": f_clean[:, features].amax(0).numpy().astype(np.float32) if features else
                np.zeros(0, np.float32),
                "corrupted_max": f_corr[:, features].amax(0).numpy().astype(np.float32) if features else
                np.zeros(0, np.float32)})
    if not features:
        result.message = "no feature of this SAE is active on either prompt"
        return result
    dirs = _decoder_directions(sae, features)  # [n, d_in]
    diff = (f_clean - f_corr)[:, features].float()  # [pos, n]
    budget = RowBudget(batch_size or rows_per_batch(lm, n_pos))
    hz = kind == "attn.hook_z"

    def compute(chunk):
        pos = torch.tensor([p for p, _ in chunk])
        feat = torch.tensor([j for _, j in chunk])
        scale = diff[:, feat].T.clone()  # [B, pos]
        if per_pos:
            keep = torch.zeros_like(scale)
            keep[torch.arange(len(chunk)), pos] = 1.0
            scale = scale * keep
        delta = scale[:, :, None] * dirs[feat][:, None, :]  # [B, pos, d_in]
        return _patched_logits(lm, corrupted, hook, layer, kind, delta, hz, cancel, run_from_layer)

    def patched_cells():
        done = 0
        with torch.inference_mode():
            for chunk, logits in chunks_shrinking_on_oom(cells, budget, compute, cancel, "feature"):
                vals = ctx(logits).cpu().numpy()
                pos = np.array([p for p, _ in chunk])
                feat = np.array([j for _, j in chunk])
                index = (pos, feat) if per_pos else (feat,)
                values[index] = vals
                done += len(chunk)
                yield Partial(index=index, values=vals)
                yield Progress(done, len(cells), f"{done} of {len(cells)} feature patches")
    return (yield from stream_cells(result, patched_cells(), t0))


def _recorded(run, hook, layer, kind) -> torch.Tensor:
    if kind == "resid_pre":  # record_run keeps these as resid_pre, not in acts
        return run.resid_pre[layer]
    if kind == "resid_post":
        return run.resid_post(layer)
    return run.acts[hook]


def _patched_logits(lm, run, hook, layer, kind, delta, hz, cancel, run_from_layer):
    """Last-position logits [B, vocab] of `run` with delta [B, pos, d_in] added at the hook."""
    def add(act):
        d = delta.to(act.device, act.dtype)
        return act + (d.reshape(*d.shape[:2], *act.shape[2:]) if hz else d)

    n_rows = delta.shape[0]
    if layer is None:  # embed / final norm: a plain batched forward pass
        ids = run.ids.expand(n_rows, -1)
        with hooks(lm, write={hook: add}, cancel=cancel):
            return forward_logits(lm, ids)[:, -1].float()
    if kind == "resid_post":
        hidden = add(run.resid_post(layer).expand(n_rows, -1, -1))
        if layer + 1 == lm.info.n_layers:
            return lm.adapter.logits_from_resid(hidden[:, -1]).float()
        return run_from_layer(lm, run, layer + 1, hidden, cancel)
    hidden = run.resid_pre[layer].expand(n_rows, -1, -1).clone()
    with hooks(lm, write={hook: add}):
        return run_from_layer(lm, run, layer, hidden, cancel)


# ---- training ----------------------------------------------------------------------------------------------

TRAIN_METRICS = ("loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr")


def collect_activations(lm, hook: str, texts: list[str], context: int = 128, max_tokens: int = 200_000,
                        batch_size: int = 16, cancel: CancelToken | None = None):
    """Job: activations [tokens, width] (float32, CPU) at `hook` over the texts, special tokens left out."""
    require_for_hook(lm, hook, f"collecting activations at {hook}", restarts=False)
    docs = corpus_mod.tokenize_documents(lm, texts, context, max_tokens)
    skip = corpus_mod.special_ids(lm)
    chunks, n_batches = [], (len(docs) + batch_size - 1) // batch_size
    for b, (_, ids, lengths) in enumerate(corpus_mod.padded_batches(docs, batch_size)):
        yield Progress(b, n_batches, f"collecting activations at {hook}: batch {b + 1} of {n_batches}")
        _, cache = run_with_cache(lm, ids, [hook], cancel=cancel)
        act = cache[hook].float()
        act = act.reshape(*act.shape[:2], -1)
        mask = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
        for s in skip:
            mask &= ids != s
        chunks.append(act[mask])
    return torch.cat(chunks) if chunks else torch.zeros(0, 0)


def _prepends_bos(lm, docs) -> bool:
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    return bool(docs) and bos is not None and docs[0][:1] == [int(bos)]


def sae_training_job(lm, hook: str, corpus_path, config: TrainConfig | dict | None = None, out_folder=None,
                     cancel: CancelToken | None = None, context: int = 128, max_tokens: int = 200_000,
                     name: str = "sae_training", *, cache_dir=None, batch_size: int = 16, resume_from=None):
    """Activations at `hook` over a local corpus (from the activation cache, computed only once per model,
    hook, corpus and context), then training (TrainMetrics events pass through); writes an SAELens folder to
    out_folder (also when cancelled: the SAE so far) with checkpoints in out_folder/checkpoints.
    cache_dir=False keeps the activations in memory instead. values [step, metric]."""
    from desktop_app.engine.sae.activation_cache import collect_activations_cached

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if out_folder is None:
        raise SAEError("SAE training needs an output folder; choose where to write the SAE.")
    lm.hook_point(hook)  # unknown hook -> SpecError before any work
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    cfg = dataclasses.replace(cfg, hook_name=hook)
    texts = corpus_mod.read_corpus(corpus_path)
    if cache_dir is False:
        acts = yield from collect_activations(lm, hook, texts, context, max_tokens, batch_size, cancel=cancel)
        cache_folder = ""
    else:
        docs = corpus_mod.tokenize_documents(lm, texts, context, max_tokens)
        if not docs:
            raise SAEError(f"Corpus {corpus_path} gives no tokens; add more text.")
        cache = yield from collect_activations_cached(lm, hook, docs, context, cache_dir=cache_dir,
                                                      batch_size=batch_size, cancel=cancel)
        acts = cache.rows(skip_ids=corpus_mod.special_ids(lm))
        cache_folder = str(cache.folder)
    if len(acts) < 2:
        raise SAEError(f"Corpus {corpus_path} gives fewer than 2 tokens at {hook}; add more text.")
    ckpt_dir = Path(out_folder) / "checkpoints"
    trained = yield from train_sae(acts, cfg, cancel, checkpoint_dir=ckpt_dir, resume_from=resume_from)
    sae = trained.sae
    sae.cfg.metadata.update(model_name=os.path.basename(str(lm.path)), context_size=int(context),
                            dataset_path=str(corpus_path),
                            prepend_bos=_prepends_bos(lm, corpus_mod.tokenize_documents(lm, texts[:1], context)))
    if lm.config_hash:
        sae.cfg.metadata["model_fingerprint"] = lm.config_hash
    # trained on inputs scaled so that E|x| = sqrt(d_in); the factor is folded into the saved weights
    sae.cfg.metadata["norm_scaling_factor_folded"] = float(trained.scaling_factor)
    with torch.inference_mode():
        fired = torch.zeros(sae.d_sae)
        for chunk in (acts.chunks(4096) if hasattr(acts, "chunks") else acts.split(4096)):
            fired += (sae.encode(chunk) != 0).sum(0).float()
    log_density = torch.log10(fired / len(acts) + 1e-10)
    folder = save_saelens(sae, out_folder, sparsity=log_density)
    history = trained.history
    values = np.array([[getattr(m, k) for k in TRAIN_METRICS] for m in history], dtype=np.float32).reshape(
        len(history), len(TRAIN_METRICS))
    return AnalysisResult(
        name=name, kind="sae_training",
        params=dict(hook=hook, corpus=str(corpus_path), out_folder=str(folder), n_tokens=int(len(acts)),
                    steps_done=int(trained.steps_done), config=dataclasses.asdict(cfg),
                    activation_cache=cache_folder, resumed_from=int(trained.resumed_from),
                    checkpoint=trained.checkpoint),
        dims=["step", "metric"], values=values,
        labels={"step": [str(m.step) for m in history], "metric": list(TRAIN_METRICS)},
        status="partial" if trained.cancelled else "complete",
        message=f"cancelled after {trained.steps_done} of {cfg.steps} steps; the SAE so far is saved"
        if trained.cancelled else "", elapsed_s=time.perf_counter() - t0,
        extras={"out_folder": np.array(str(folder)), "log_feature_density": log_density.numpy().astype(np.float32)})
