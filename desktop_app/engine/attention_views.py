"""Attention patterns, attention rollout and attention flow (Abnar & Zuidema 2020).

Patterns: every chosen layer's `attn.hook_pattern` [head, query, key] from ONE forward pass (eager attention;
grouped-query models give one pattern per query head). Rollout: each layer's head-fused pattern A (mean or
max over heads) becomes (1 - r) A + r I, rows renormalised; rollout through layers 0..L is the product
A'_L ... A'_0, a [query, key] matrix whose rows sum to 1. Flow: the same residual-adjusted matrices are the
capacities of a layered graph (edge key at layer L - 1 -> query at layer L); the value at [L, query, key] is
the maximum flow from input token `key` to position `query` after layer L (Edmonds-Karp, exact).
"""
from __future__ import annotations

import time
from collections import deque

import numpy as np
import torch

from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.results import AnalysisResult, empty_values

HEAD_FUSIONS = ("mean", "max")
ROLLOUT_METHODS = ("rollout", "flow")
MAX_FLOW_NODES = 400  # (layers + 1) x positions; the exact flow grows steeply with the graph, rollout does not


def _choose(values, n: int, what: str) -> list[int]:
    if values is None or values == "all":
        return list(range(n))
    chosen = [int(v) for v in (values if isinstance(values, (list, tuple)) else [values])]
    bad = [v for v in chosen if not 0 <= v < n]
    if bad or not chosen:
        raise SpecError(f"{what} {bad[0] if bad else '(none)'} is out of range: this model has {what}s 0-{n - 1}.")
    return chosen


def record_patterns(lm, ids, layers, cancel: CancelToken | None = None) -> torch.Tensor:
    """Patterns [len(layers), head, query, key] (float32, CPU) of one forward pass."""
    names = [hook_name(L, "attn.hook_pattern") for L in layers]
    _, store = run_with_cache(lm, [list(ids)], names, cancel=cancel)
    return torch.stack([store[n][0].float() for n in names])


def attention_patterns_job(lm, tokens: TokenInfo, layers="all", heads="all", name: str = "attention_patterns",
                           prompt_label: str = "clean", cancel: CancelToken | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    layers = _choose(layers, lm.info.n_layers, "layer")
    heads = _choose(heads, lm.info.n_heads, "head")
    n = len(tokens.ids)
    values = empty_values((len(layers), len(heads), n, n))
    result = AnalysisResult(
        name=name, kind="attention_patterns", params=dict(prompt=prompt_label, layers=layers, heads=heads),
        dims=["layer", "head", "query", "key"], values=values,
        labels={"layer": [str(L) for L in layers], "head": [str(h) for h in heads],
                "query": tokens.labels(), "key": tokens.labels()},
        tokens_clean=np.array(tokens.ids, dtype=np.int64))

    def cells():
        yield Progress(0, values.size, "one forward pass")
        patterns = record_patterns(lm, tokens.ids, layers, cancel)
        values[:] = patterns[:, heads].numpy()
        yield Partial(index=np.indices(values.shape, sparse=True), values=values.copy())
        yield Progress(values.size, values.size, "done")
    return (yield from stream_cells(result, cells(), t0))


def residual_adjusted(patterns: torch.Tensor, residual: float, head_fusion: str) -> torch.Tensor:
    """Per layer (1 - r) fuse(A) + r I with rows renormalised: [layer, query, key] float64."""
    if head_fusion not in HEAD_FUSIONS:
        raise SpecError(f"head_fusion must be mean or max, not {head_fusion!r}.")
    if not 0.0 <= float(residual) <= 1.0:
        raise SpecError(f"residual must be between 0 and 1, not {residual}.")
    p = patterns.double()
    fused = p.mean(1) if head_fusion == "mean" else p.max(1).values
    eye = torch.eye(fused.shape[-1], dtype=fused.dtype)
    a = (1.0 - residual) * fused + residual * eye
    return a / a.sum(-1, keepdim=True)


def rollout(adjusted: torch.Tensor) -> torch.Tensor:
    """[layer, query, key]: the product of the adjusted patterns of layers 0..L."""
    out = torch.empty_like(adjusted)
    acc = torch.eye(adjusted.shape[-1], dtype=adjusted.dtype)
    for L in range(adjusted.shape[0]):
        acc = adjusted[L] @ acc
        out[L] = acc
    return out


def max_flow(capacity: np.ndarray, source: int, sink: int) -> float:
    """Edmonds-Karp maximum flow on a dense capacity matrix (float)."""
    residual = capacity.astype(np.float64).copy()
    n = residual.shape[0]
    total = 0.0
    while True:
        parent = np.full(n, -1)
        parent[source] = source
        queue = deque([source])
        while queue and parent[sink] < 0:
            u = queue.popleft()
            for v in np.nonzero((residual[u] > 1e-15) & (parent < 0))[0]:
                parent[v] = u
                queue.append(v)
        if parent[sink] < 0:
            return total
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u, w] for u, w in path)
        for u, w in path:
            residual[u, w] -= push
            residual[w, u] += push
        total += push


def flow_graph(adjusted: np.ndarray, upto: int) -> np.ndarray:
    """Capacity matrix over nodes (level, position), level 0 = input tokens, level L + 1 = after layer L,
    for layers 0..upto; node index level * n + position."""
    n = adjusted.shape[-1]
    size = (upto + 2) * n
    cap = np.zeros((size, size))
    for L in range(upto + 1):
        # edge key (level L) -> query (level L + 1) with capacity A'_L[query, key]
        cap[L * n:(L + 1) * n, (L + 1) * n:(L + 2) * n] = adjusted[L].T
    return cap


def attention_rollout_job(lm, tokens: TokenInfo, residual: float = 0.5, head_fusion: str = "mean",
                          method: str = "rollout", name: str = "attention_rollout", prompt_label: str = "clean",
                          cancel: CancelToken | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if method not in ROLLOUT_METHODS:
        raise SpecError(f"method must be rollout or flow, not {method!r}.")
    n_layers, n = lm.info.n_layers, len(tokens.ids)
    if method == "flow" and (n_layers + 1) * n > MAX_FLOW_NODES:
        raise SpecError(f"attention flow is exact and needs a graph of {(n_layers + 1) * n} nodes here (at most "
                        f"{MAX_FLOW_NODES}); shorten the prompt or choose rollout.")
    values = empty_values((n_layers, n, n))
    result = AnalysisResult(
        name=name, kind="attention_rollout",
        params=dict(prompt=prompt_label, residual=float(residual), head_fusion=head_fusion, method=method),
        dims=["layer", "query", "key"], values=values,
        labels={"layer": [str(L) for L in range(n_layers)], "query": tokens.labels(), "key": tokens.labels()},
        tokens_clean=np.array(tokens.ids, dtype=np.int64))

    def cells():
        yield Progress(0, values.size, "one forward pass")
        adjusted = residual_adjusted(record_patterns(lm, tokens.ids, range(n_layers), cancel), residual, head_fusion)
        if method == "rollout":
            values[:] = rollout(adjusted).numpy()
            yield Partial(index=np.indices(values.shape, sparse=True), values=values.copy())
            yield Progress(values.size, values.size, "done")
            return
        adj = adjusted.numpy()
        for L in range(n_layers):
            cap = flow_graph(adj, L)
            for q in range(n):
                cancel.check()
                sink = (L + 1) * n + q
                row = np.array([max_flow(cap, k, sink) if k <= q or _reaches(adj, L, q, k) else 0.0
                                for k in range(n)], dtype=np.float32)
                values[L, q] = row
                yield Partial(index=(np.full(n, L), np.full(n, q), np.arange(n)), values=row)
                yield Progress((L * n + q + 1) * n, values.size, f"flow, layer {L}")
    return (yield from stream_cells(result, cells(), t0))


def _reaches(adj: np.ndarray, upto: int, query: int, key: int) -> bool:
    """Whether any path carries key to query (with a causal mask none does for key > query)."""
    reach = np.zeros(adj.shape[-1], dtype=bool)
    reach[key] = True
    for L in range(upto + 1):
        reach = (adj[L][:, reach] > 0).any(-1)
    return bool(reach[query])
