"""Check a graph's hypothesis on the real model: clamp one feature node (its activation moved by `delta`, i.e.
delta * its decoder vector added to its layer's MLP output at its position), re-run the real model, and compare
the measured change of the graph's logits with the graph's linear prediction (all paths through the stored
feature-to-feature and feature-to-logit edges; embeddings and error nodes held fixed)."""
from __future__ import annotations

import numpy as np
import torch

from desktop_app.engine.errors import SpecError


def predicted_logit_change(extras: dict, node_id: str, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """(all paths, direct edge only): the change of each logit node's input when the feature's activation moves
    by delta. Edge weights are activation x per-unit effect, so a feature source's column is divided by its
    activation; an active feature passes a change of its input on to its activation with slope 1 (ReLU /
    TopK / JumpReLU above threshold)."""
    ids = [str(i) for i in extras["node_ids"]]
    if node_id not in ids:
        raise SpecError(f"the graph has no node {node_id!r}.")
    s = ids.index(node_id)
    kinds = np.asarray(extras["node_kind"]).astype(str)
    if kinds[s] != "feature":
        raise SpecError(f"only feature nodes can be clamped; {node_id!r} is a {kinds[s]} node.")
    adj = np.asarray(extras["adjacency"], dtype=np.float64)
    act = np.asarray(extras["node_activation"], dtype=np.float64)
    f, lg = np.where(kinds == "feature")[0], np.where(kinds == "logit")[0]
    per_unit = adj[:, f] / act[f][None, :]
    m_ff, m_lf = per_unit[f], per_unit[lg]
    change = np.zeros(len(f))
    change[list(f).index(s)] = delta
    change = np.linalg.solve(np.eye(len(f)) - m_ff, change)  # the features form a DAG: I - M is invertible
    return m_lf @ change, per_unit[lg][:, list(f).index(s)] * delta


def measured_logit_change(lm, token_ids, tset, layer: int, pos: int, feature: int, delta: float,
                          logit_tokens) -> np.ndarray:
    """The real model's change of the given next-token logits when delta * W_dec[feature] is added to layer's
    MLP output at pos."""
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    vec = delta * tset.decoder_rows(layer, [feature])[0]

    def write(_mod, _args, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[:, pos] += vec.to(out.dtype)
        return (out,) + tuple(output[1:]) if isinstance(output, tuple) else out

    def logits():
        with torch.no_grad():
            return lm.model(ids).logits[0, -1, list(logit_tokens)].double().numpy()

    base = logits()
    handle = lm.adapter.mlp(layer).register_forward_hook(write)
    try:
        clamped = logits()
    finally:
        handle.remove()
    return clamped - base


def clamp_check(lm, token_ids, tset, extras: dict, node_id: str, delta: float) -> dict:
    ids = [str(i) for i in extras["node_ids"]]
    predicted, direct = predicted_logit_change(extras, node_id, delta)
    s = ids.index(node_id)
    kinds = np.asarray(extras["node_kind"]).astype(str)
    lg = np.where(kinds == "logit")[0]
    tokens = np.asarray(extras["node_feature"])[lg]
    measured = measured_logit_change(lm, token_ids, tset, int(extras["node_layer"][s]), int(extras["node_pos"][s]),
                                     int(extras["node_feature"][s]), delta, tokens)
    return {"node_id": node_id, "delta": delta, "logit_tokens": tokens, "predicted": predicted,
            "predicted_direct": direct, "measured": measured}
