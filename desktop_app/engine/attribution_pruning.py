"""Influence, pruning and scores of an attribution graph.

Influence is the total (all paths) effect of a node on the logits through the row-normalised |adjacency|. Pruning
keeps the fewest features that carry `node_threshold` of the feature influence (errors, embeddings and logits
always kept), then the fewest edges among the kept nodes that carry `edge_threshold` of the edge influence. The
[node, node] work is done in float32 in place (sums in float64), so a graph needs about three float32 copies of its
adjacency at its peak.
"""
from __future__ import annotations

import numpy as np

from desktop_app.engine.attribution_edges import EMBEDDING, ERROR, FEATURE, LOGIT, Graph


def normalised(adjacency: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """|A| with each row divided by its sum (rows summing to 0 stay 0), float32; with `keep`, the rows and columns
    of the other nodes are zero first."""
    w = np.abs(adjacency, dtype=np.float32)
    if keep is not None:
        w[~keep] = 0
        w[:, ~keep] = 0
    s = w.sum(1, dtype=np.float64)
    inv = np.divide(1.0, s, out=np.zeros_like(s), where=s > 0).astype(np.float32)
    w *= inv[:, None]
    return w


def influence(weights: np.ndarray, logit_weights: np.ndarray) -> np.ndarray:
    """Total (all paths) influence of each node on the logits: w (W + W^2 + ...), W the row-normalised |A|."""
    x, total = logit_weights.astype(np.float64), np.zeros(len(logit_weights))
    for _ in range(len(logit_weights)):
        x = (x.astype(weights.dtype) @ weights).astype(np.float64)
        if not np.any(x):
            break
        total += x
    return total


def _logit_weights(graph: Graph) -> np.ndarray:
    w = np.zeros(graph.n)
    idx = [i for i, k in enumerate(graph.node_kind) if k == LOGIT]
    w[idx] = graph.logit_probs / graph.logit_probs.sum()
    return w


def smallest_covering(scores: np.ndarray, fraction: float) -> np.ndarray:
    """Mask of the fewest (highest) scores whose sum reaches `fraction` of the total."""
    mask = np.zeros(len(scores), dtype=bool)
    total = scores.sum()
    if total <= 0:
        return mask
    order = np.argsort(-scores, kind="stable")
    cum = np.cumsum(scores[order])
    count = int(np.searchsorted(cum, fraction * total * (1 - 1e-12))) + 1
    mask[order[:min(count, len(scores))]] = True
    return mask


def smallest_covering_2d(scores: np.ndarray, fraction: float, chunk: int = 1 << 20) -> np.ndarray:
    """smallest_covering of a non-negative [n, n] array without sorting its n² entries' indices: sort the nonzero
    values, find the count and the last value taken, then take every larger entry and, of the entries equal to it,
    the first ones in row-major order (as a stable sort of the flattened array would)."""
    flat = scores.reshape(-1)
    values = flat[flat > 0].astype(np.float64)
    mask = np.zeros(scores.shape, dtype=bool)
    total = values.sum()
    if total <= 0:
        return mask
    values[::-1].sort()  # descending, in place
    goal, running, count = fraction * total * (1 - 1e-12), 0.0, len(values)
    for a in range(0, len(values), chunk):
        cum = running + np.cumsum(values[a:a + chunk])
        hit = int(np.searchsorted(cum, goal))
        if hit < len(cum):
            count = a + hit + 1
            break
        running = float(cum[-1])
    last = values[count - 1]
    del values
    mask = scores > last
    ties = np.flatnonzero(flat == last)[:count - int(mask.sum())]
    mask.reshape(-1)[ties] = True
    return mask


def prune(graph: Graph, node_threshold: float, edge_threshold: float):
    """(node mask, edge mask [target, source], influence): features covering node_threshold of the feature
    influence (errors, embeddings and logits always kept), then edges covering edge_threshold of the edge
    influence among them."""
    kinds = np.array(graph.node_kind)
    lw = _logit_weights(graph)
    infl = influence(normalised(graph.adjacency), lw)
    is_f = kinds == FEATURE
    node_mask = ~is_f
    node_mask[np.where(is_f)[0][smallest_covering(infl[is_f], node_threshold)]] = True
    w = normalised(graph.adjacency, node_mask)
    w *= (influence(w, lw) + lw).astype(np.float32)[:, None]  # edge scores, in place
    edge_mask = smallest_covering_2d(w, edge_threshold)
    del w
    edge_mask &= graph.adjacency != 0
    return node_mask, edge_mask, infl


def scores(graph: Graph) -> tuple[float, float]:
    """(replacement score, completeness score): the share of the end-to-end influence that reaches the logits from
    token embeddings rather than error nodes; the influence-weighted share of each node's direct input that comes
    from non-error nodes."""
    kinds = np.array(graph.node_kind)
    w = normalised(graph.adjacency)
    lw = _logit_weights(graph)
    infl = influence(w, lw)
    tok, err = infl[kinds == EMBEDDING].sum(), infl[kinds == ERROR].sum()
    replacement = float(tok / (tok + err)) if tok + err > 0 else float("nan")
    err = np.where(kinds == ERROR)[0]
    if len(err) and err[-1] - err[0] + 1 == len(err):
        err = slice(err[0], err[-1] + 1)  # a view, not a copy of those columns
    non_error = 1.0 - w[:, err].sum(1, dtype=np.float64)
    weight = infl + lw
    has_input = w.sum(1, dtype=np.float64) > 0
    completeness = float((weight * non_error)[has_input].sum() / weight[has_input].sum())
    return replacement, completeness
