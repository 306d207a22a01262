"""Steering vectors (the `steering_vector` kind): one direction per layer from positive and negative texts.

    mean_diff: mean(positive) - mean(negative) of the pooled activations (with pairs, the mean of the
               pair differences, which is the same number) — steering-vectors' mean aggregator, not normalised.
    pca:       the first principal component of the pair differences taken without centring (the PCA of
               [deltas; -deltas]), unit norm, its sign chosen so that the mean difference projects positively —
               steering-vectors' pca aggregator. Needs pairs (equal-length lists are paired by index).

    result = drive(steering_vector_job(lm, positive, negative, method="mean_diff", hook="resid_post"))
    result.values                   # [layer, d_model]
    writes = steering_writes(result, coefficient=4.0, layers=[3, 4])   # for engine.edits.intervention_job
"""
from __future__ import annotations

import os
import time

import numpy as np

from desktop_app.engine.activations_dataset import check_layer_kind, collect_pooled
from desktop_app.engine.conformance import require_for_hook
from desktop_app.engine.edits import add_direction, intervention_job
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.results import AnalysisResult
from desktop_app.engine.text_data import read_pairs, read_texts

METHODS = ("mean_diff", "pca")


def mean_diff_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """[n_pos, d], [n_neg, d] -> [d]."""
    return pos.astype(np.float64).mean(0) - neg.astype(np.float64).mean(0)


def pca_direction(pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """First uncentred principal component of the pair differences, unit norm, sign toward the positives."""
    deltas = pos.astype(np.float64) - neg.astype(np.float64)
    _, _, vt = np.linalg.svd(deltas, full_matrices=False)
    v = vt[0]
    if np.mean(deltas @ v) < 0:
        v = -v
    return v


def steering_vector_job(lm, positive=None, negative=None, pairs=None, method: str = "mean_diff",
                        hook: str = "resid_post", position: str = "last", batch_size: int = 16, cache_dir=None,
                        cancel: CancelToken | None = None, name: str = "steering_vector",
                        prepend_bos: bool | None = None):
    """Job: the `steering_vector` analysis. Give `positive` and `negative` (text lists or files), or `pairs` (a
    positive,negative CSV/JSONL or a list of pairs)."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    kind = check_layer_kind(lm, hook)
    if method not in METHODS:
        raise SpecError(f"steering method {method!r} is unknown; use mean_diff or pca.")
    if pairs is not None:
        pos_texts, neg_texts = read_pairs(pairs)
    else:
        pos_texts = read_texts(positive, "positive texts")
        neg_texts = read_texts(negative, "negative texts")
    paired = len(pos_texts) == len(neg_texts)
    if method == "pca" and not paired:
        raise SpecError(f"pca needs contrastive pairs but there are {len(pos_texts)} positive and {len(neg_texts)} "
                        "negative texts; give as many of each (paired by order) or use mean_diff.")
    if method == "pca" and len(pos_texts) < 2:
        raise SpecError("pca needs at least 2 pairs; add pairs or use mean_diff.")
    pos = yield from collect_pooled(lm, pos_texts, kind, position, batch_size, cache_dir, cancel, prepend_bos,
                                    what="positive text")
    neg = yield from collect_pooled(lm, neg_texts, kind, position, batch_size, cache_dir, cancel, prepend_bos,
                                    what="negative text")
    n_layers, width = pos.shape[0], pos.shape[2]
    values = np.zeros((n_layers, width), dtype=np.float32)
    separation = np.full(n_layers, np.nan, dtype=np.float32)
    for layer in range(n_layers):
        cancel.check()
        v = (pca_direction if method == "pca" else mean_diff_direction)(pos[layer], neg[layer])
        values[layer] = v
        if paired:  # how often a pair is ordered along the direction as it should be
            separation[layer] = float(np.mean(pos[layer] @ v > neg[layer] @ v))
        yield Partial(index=(np.array([layer]),), values=values[layer][None])
        yield Progress(layer + 1, n_layers, f"direction of layer {layer}")
    return AnalysisResult(
        name=name, kind="steering_vector",
        params=dict(method=method, hook=kind, position=position, n_positive=len(pos_texts),
                    n_negative=len(neg_texts), paired=bool(paired),
                    source=str(pairs) if isinstance(pairs, (str, os.PathLike)) else "inline",
                    model_type=str(lm.info.model_type), d_model=int(width)),
        dims=["layer", "d_model"], values=values,
        labels={"layer": [str(i) for i in range(n_layers)], "d_model": [str(i) for i in range(width)]},
        elapsed_s=time.perf_counter() - t0,
        extras={"norm": np.linalg.norm(values, axis=1).astype(np.float32), "pair_separation": separation})


def steering_writes(directions: np.ndarray, kind: str, coefficient: float, layers, positions=None) -> dict:
    """{hook name: write} adding coefficient * directions[layer] at `kind` of each chosen layer."""
    n_layers = directions.shape[0]
    writes = {}
    for layer in layers:
        if not 0 <= int(layer) < n_layers:
            raise SpecError(f"layer {layer} is out of range: the directions cover layers 0-{n_layers - 1}.")
        writes[hook_name(int(layer), kind)] = add_direction(directions[int(layer)], coefficient, positions)
    return writes


def steering_intervention_job(lm, text, directions: np.ndarray, kind: str = "resid_post", coefficient: float = 4.0,
                              layers=None, n_continue: int = 20, top_n: int = 10, positions=None,
                              cancel: CancelToken | None = None, name: str = "steering"):
    """Job: greedy continuations and the next-token distribution before / after adding coefficient *
    directions[layer] at the chosen layers (engine.edits.intervention_job's result)."""
    directions = np.asarray(directions, dtype=np.float32)
    if directions.ndim != 2 or directions.shape[1] != lm.info.d_model:
        raise SpecError(f"the directions have width {directions.shape[-1]} but this model's d_model is "
                        f"{lm.info.d_model}; use directions computed for this model.")
    kind = check_layer_kind(lm, kind)
    layers = list(range(directions.shape[0])) if layers is None else [int(x) for x in layers]
    writes = steering_writes(directions, kind, coefficient, layers, positions)
    for hook in writes:
        require_for_hook(lm, hook, f"steering at {hook}", restarts=False)
    return (yield from intervention_job(lm, text, writes, n_continue, top_n, cancel, name, kind="steering",
                                        params=dict(hook=kind, coefficient=float(coefficient), layers=layers)))
