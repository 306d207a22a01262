"""Attribution graphs through per-layer or cross-layer transcoders (circuit tracing), on the CPU: the job.

The work is split by what it is: `attribution_replacement` (the frozen replacement model: hooks, frozen attention
and norms), `attribution_edges` (active features, nodes, edges by batched backward passes, the memory estimate),
`attribution_pruning` (influence, pruning, replacement and completeness scores). Their public names are importable
from here too.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.attribution_edges import (EMBEDDING, ERROR, FEATURE, GRAPH_BYTES_PER_CELL,  # noqa: F401
                                                  LOGIT, ActiveFeatures, FrozenBackward, Graph, active_features,
                                                  build_graph, default_budget, estimate_bytes, partial_influence)
from desktop_app.engine.attribution_pruning import (_logit_weights, influence, normalised, prune,  # noqa: F401
                                                    scores, smallest_covering, smallest_covering_2d)
from desktop_app.engine.attribution_replacement import (ReplacementContext, _detached_run,  # noqa: F401
                                                        check_supported)
from desktop_app.engine.jobs import CancelToken
from desktop_app.engine.results import AnalysisResult


def attribution_graph_job(lm, tokens, tset_path: str, max_feature_nodes: int = 7500, node_threshold: float = 0.8,
                          edge_threshold: float = 0.98, max_n_logits: int = 10, desired_logit_prob: float = 0.95,
                          name: str = "attribution_graph", prompt_label: str = "clean",
                          cancel: CancelToken | None = None, tset=None):
    from desktop_app.engine.transcoders import load_transcoder_set

    t0 = time.perf_counter()
    # the backward passes need grad mode, also where the caller (the window's runner) runs jobs under inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        if tset is None:
            tset = load_transcoder_set(tset_path, n_layers=lm.info.n_layers, d_model=lm.info.d_model)
        ids = torch.tensor([tokens.ids], dtype=torch.long)
        graph = yield from build_graph(lm, ids, tset, max_feature_nodes, max_n_logits, desired_logit_prob,
                                       cancel=cancel)
    node_mask, edge_mask, infl = prune(graph, node_threshold, edge_threshold)
    replacement, completeness = scores(graph)
    keep = np.where(node_mask)[0]
    sub = np.ix_(keep, keep)
    adj = graph.adjacency[sub] * edge_mask[sub]
    ids_all = np.array(graph.node_ids())
    kinds = np.array(graph.node_kind)
    lw = _logit_weights(graph)
    extras = {"adjacency": adj.astype(np.float32), "node_ids": ids_all[keep], "node_kind": kinds[keep],
              "node_layer": graph.node_layer[keep], "node_pos": graph.node_pos[keep],
              "node_feature": graph.node_feature[keep], "node_activation": graph.activation[keep],
              "node_influence": (infl + lw)[keep], "replacement_score": np.asarray(replacement),
              "completeness_score": np.asarray(completeness),
              "logit_bias": graph.bias[keep], "node_input": graph.target_input[keep],
              "max_replacement_logit_diff": np.asarray(float(np.abs(graph.replacement_logits
                                                                     - graph.real_logits[-1]).max()))}
    extras["prompt_tokens"] = np.array(list(tokens.display) if tokens.display else [str(t) for t in tokens.ids])
    kept_kinds = kinds[keep]
    logit_ids = graph.node_feature[keep][kept_kinds == "logit"]
    logit_text = iter(lm.tokens_of_ids(logit_ids).display if len(logit_ids) else [])
    extras["node_token_text"] = np.array([next(logit_text) if k == "logit" else "" for k in kept_kinds])
    extras["model_n_layers"] = np.asarray(lm.info.n_layers)
    extras["model_vocab_size"] = np.asarray(lm.info.vocab_size)
    return AnalysisResult(
        name=name, kind="attribution_graph",
        params={"prompt": prompt_label, "node_threshold": node_threshold, "edge_threshold": edge_threshold,
                "max_feature_nodes": max_feature_nodes, "max_n_logits": max_n_logits,
                "desired_logit_prob": desired_logit_prob, "transcoders": str(tset_path or ""),
                "scan": Path(lm.path).name if getattr(lm, "path", None) else lm.info.model_type},
        dims=["node"], values=(infl + lw)[keep].astype(np.float32), labels={"node": list(ids_all[keep])},
        tokens_clean=np.asarray(tokens.ids, dtype=np.int64), elapsed_s=time.perf_counter() - t0, extras=extras)
