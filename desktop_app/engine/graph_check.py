"""Check a graph's hypothesis on the model: clamp one or several feature nodes (a supernode) to new activations and
compare the graph's linear prediction of the change of its logits with three measurements.

A clamp sets a feature's activation to `activation + delta` (circuit-tracer's `feature_intervention` semantics: in
every run the decoder row times (target - the feature's current activation) is added to its layer's MLP output at
its position, so a clamped feature stays clamped whatever its inputs do; a cross-layer transcoder's feature adds its
decoder row for every layer it writes into, to that layer's MLP output). The prediction sums the paths through the
graph's feature -> feature and feature -> logit edges (embeddings and error nodes held fixed; the paths into a
clamped feature are cut, since its activation is fixed). It is measured three times, each against an unedited run
of the same model:

    graph   the graph's own model: attention patterns and norm scales frozen at the prompt, MLPs replaced by their
            transcoders plus a fixed error per layer and position. This model is affine in the feature activations,
            so it equals the prediction of the full graph exactly, for any delta, unless a downstream feature
            crosses its threshold (ReLU / JumpReLU) or enters / leaves its TopK set; those are reported by name.
            A pruned graph also loses the paths through the nodes and edges it dropped.
    frozen  the real model with attention patterns and norm scales frozen, real MLPs (the decoder edit added to the
            real MLP output): what the transcoders' approximation of the MLPs costs. (circuit-tracer's
            feature_intervention freezes the attention patterns by default, and the norm denominators only when it
            is constrained to every layer; here both are frozen, as in the graph.)
    real    the real model, nothing frozen.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from desktop_app.engine.attribution_graph import ReplacementContext, _detached_run, check_supported
from desktop_app.engine.attribution_replacement import check_reproduces, is_cross_layer, width_of
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import CancelToken
from desktop_app.engine.replay import record_run, run_from_layer

MEASURED = ("measured_graph", "measured_frozen", "measured_real")


def _as_lists(node_ids, deltas) -> tuple[list[str], list[float]]:
    ids = [node_ids] if isinstance(node_ids, str) else [str(i) for i in node_ids]
    ds = [float(deltas)] * len(ids) if np.ndim(deltas) == 0 else [float(d) for d in deltas]
    if not ids:
        raise SpecError("no feature node was given to clamp; pin a feature or select a supernode.")
    if len(ds) != len(ids):
        raise SpecError(f"{len(ids)} nodes were given with {len(ds)} deltas; give one delta per node.")
    if len(set(ids)) != len(ids):
        raise SpecError("a node was given twice; clamp each node once.")
    return ids, ds


def predicted_logit_change(extras: dict, node_ids, deltas) -> tuple[np.ndarray, np.ndarray]:
    """(all paths, direct edges only): the change of each logit node's input when the given features are clamped to
    their activation + delta. Edge weights are activation x per-unit effect, so a feature source's column is divided
    by its activation; an active feature passes a change of its input on to its activation with slope 1 (ReLU /
    TopK / JumpReLU above threshold); a clamped feature passes nothing on (its activation is fixed)."""
    node_ids, deltas = _as_lists(node_ids, deltas)
    ids = [str(i) for i in extras["node_ids"]]
    kinds = np.asarray(extras["node_kind"]).astype(str)
    for node_id in node_ids:
        if node_id not in ids:
            raise SpecError(f"the graph has no node {node_id!r}.")
        if kinds[ids.index(node_id)] != "feature":
            raise SpecError(f"only feature nodes can be clamped; {node_id!r} is a "
                            f"{kinds[ids.index(node_id)]} node.")
    adj = np.asarray(extras["adjacency"], dtype=np.float64)
    act = np.asarray(extras["node_activation"], dtype=np.float64)
    f, lg = np.where(kinds == "feature")[0], np.where(kinds == "logit")[0]
    per_unit = adj[:, f] / act[f][None, :]
    m_ff, m_lf = per_unit[f].copy(), per_unit[lg]
    clamped = [list(f).index(ids.index(n)) for n in node_ids]
    m_ff[clamped] = 0.0
    change = np.zeros(len(f))
    change[clamped] = deltas
    change = np.linalg.solve(np.eye(len(f)) - m_ff, change)  # the features form a DAG: I - M is invertible
    direct = np.zeros(len(f))
    direct[clamped] = deltas
    return m_lf @ change, m_lf @ direct


class _CheckContext(ReplacementContext):
    """The replacement context with two MLP behaviours (`mlp`: "graph" = transcoder + fixed error, "real") and the
    clamps {layer: [(pos, feature, target activation)]} applied on top, to every row of the batch but the first (the
    unedited run); the base class's mode "frozen" freezes the attention patterns and norm scales, "replacement" leaves
    them live."""

    def __init__(self, lm, tset):
        super().__init__(lm, tset)
        self.mlp = "real"
        self.clamps: dict[int, list] = {}
        self.active: dict[int, torch.Tensor] = {}  # graph mode: the active-feature mask per layer of the last run

    def _mlp_hook(self, layer):
        recording = super()._mlp_hook(layer)

        def hook(mod, args, output):
            if self.mode == "record":
                return recording(mod, args, output)
            x = self.transcoder_input(layer, args[0]).float()
            out = output[0] if isinstance(output, tuple) else output
            if self.mlp == "graph":
                new = self._replaced(layer, x) + self.errors[layer]
                self.active[layer] = (self.acts[layer] != 0).detach().clone()
            else:
                self.encode(layer, x)
                new = out.float()
            # a cross-layer feature read at s <= layer writes into this layer too
            for s in range(layer + 1) if is_cross_layer(self.tset) else (layer,):
                for pos, feature, target in self.clamps.get(s, ()):
                    new = new.clone()
                    new[1:, pos] += (target - self.acts[s][1:, pos, feature])[:, None] * self._decoder_row(s, feature,
                                                                                                           layer)
            new = new.to(out.dtype)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def _decoder_row(self, read_layer: int, feature: int, layer: int) -> torch.Tensor:
        """What feature `feature` read at `read_layer` writes per unit of activation into layer `layer`'s MLP output
        (circuit-tracer's intervention on a cross-layer feature adds it for every layer it writes into)."""
        if is_cross_layer(self.tset):
            return self.tset.W_dec[read_layer][feature, layer - read_layer].float()
        return self.tset.layers[layer].decoder_rows([feature])[0]


def _crossings(active: dict, clamped: set) -> list[tuple[int, int, int, bool]]:
    """(layer, feature, pos, now active) of every feature whose active state differs between the unedited (row 0)
    and the edited (row 1) graph-model run."""
    out = []
    for L in sorted(active):
        pos_i, feat_i = (active[L][0] != active[L][1]).nonzero(as_tuple=True)
        out += [(L, int(f), int(p), bool(active[L][1, p, f])) for p, f in zip(pos_i.tolist(), feat_i.tolist())
                if (L, int(f), int(p)) not in clamped]
    return out


def measure_clamps(lm, token_ids, tset, clamps: Sequence[tuple[int, int, int, float]], logit_tokens,
                   cancel: CancelToken | None = None) -> dict:
    """clamps: (layer, pos, feature, target activation). Returns {measured_graph, measured_frozen, measured_real}
    (the change of the given next-token logits, edited minus unedited run of the same model) and `crossings`."""
    cancel = cancel or CancelToken()
    check_supported(lm, tset)
    ids = torch.tensor([list(token_ids)], dtype=torch.long)
    tokens = list(logit_tokens)
    run = _detached_run(record_run(lm, ids, cancel=cancel))
    edits: dict[int, list] = {}
    for L, p, f, target in clamps:
        if not (0 <= L < len(tset) and 0 <= p < ids.shape[1] and 0 <= f < width_of(tset, L)):
            raise SpecError(f"feature {L}_{f}_{p} is not in this model and transcoder set at this prompt "
                            f"({len(tset)} layers, {ids.shape[1]} tokens); check the graph was computed with them.")
        edits.setdefault(int(L), []).append((int(p), int(f), float(target)))
    out, bases = {}, []
    with _CheckContext(lm, tset) as ctx, torch.no_grad():
        run_from_layer(lm, run, 0, run.resid_pre[0], cancel=cancel, last_only=False)  # records what is frozen
        xs = [x.float() for x in ctx.mlp_in0]
        recon = tset(xs) if is_cross_layer(tset) else [tc(x) for tc, x in zip(tset.layers, xs)]
        ctx.errors = [ctx.mlp_out0[L].float() - recon[L] for L in range(len(tset))]
        ctx.clamps = edits
        for name, mode, mlp in (("measured_graph", "frozen", "graph"), ("measured_frozen", "frozen", "real"),
                                ("measured_real", "replacement", "real")):
            ctx.set_mode(mode)
            ctx.mlp, ctx.active = mlp, {}
            # one pass of two rows: unedited, then clamped
            logits = run_from_layer(lm, run, 0, run.resid_pre[0].repeat(2, 1, 1), cancel=cancel).double().numpy()
            out[name] = logits[1][tokens] - logits[0][tokens]
            bases.append(logits[0])
            if mlp == "graph":
                out["crossings"] = _crossings(ctx.active, {(L, f, p) for L, p, f, _ in clamps})
        ctx.clamps = {}
        ctx.set_mode("record")
    # unedited, the three models are the same function at this prompt; if not, their differences mean nothing
    check_reproduces(bases[0], bases[-1], "the graph's model")
    check_reproduces(bases[1], bases[-1], "the frozen model")
    return out


def crossing_text(crossings) -> str:
    """One sentence naming the downstream features whose active state changed (at most three by name; for TopK
    transcoders, crossing the threshold means entering or leaving the top k)."""
    if not len(crossings):
        return "No downstream feature crossed its threshold, so the graph's model is exactly linear here."
    names = [f"{L}_{f}_{p} crossed its threshold (now {'on' if on else 'off'})" for L, f, p, on in crossings]
    more = f" and {len(names) - 3} more features did too" if len(names) > 3 else ""
    return f"Feature {'; feature '.join(names[:3])}{more}, so the graph's model is not linear over this clamp."


def clamp_check(lm, token_ids, tset, extras: dict, node_ids, deltas, cancel: CancelToken | None = None) -> dict:
    """Clamp the feature nodes `node_ids` (one id or a list; a supernode) to their activation + delta (one delta
    for all or one per node) all at once; the graph's prediction beside the three measurements (module docstring).
    `measured` is the real model's change."""
    node_ids, deltas = _as_lists(node_ids, deltas)
    predicted, direct = predicted_logit_change(extras, node_ids, deltas)
    ids = [str(i) for i in extras["node_ids"]]
    kinds = np.asarray(extras["node_kind"]).astype(str)
    lg = np.where(kinds == "logit")[0]
    tokens = np.asarray(extras["node_feature"])[lg]
    clamps = []
    for node_id, delta in zip(node_ids, deltas):
        s = ids.index(node_id)
        clamps.append((int(extras["node_layer"][s]), int(extras["node_pos"][s]), int(extras["node_feature"][s]),
                       float(extras["node_activation"][s]) + delta))
    measured = measure_clamps(lm, token_ids, tset, clamps, tokens, cancel=cancel)
    return {"node_ids": node_ids, "deltas": np.asarray(deltas), "delta": float(deltas[0]), "logit_tokens": tokens,
            "predicted": predicted, "predicted_direct": direct, "measured": measured["measured_real"],
            **{k: measured[k] for k in MEASURED}, "crossings": measured["crossings"],
            "crossing_text": crossing_text(measured["crossings"])}
