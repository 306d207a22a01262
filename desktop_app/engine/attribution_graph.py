"""Attribution graphs through per-layer transcoders (circuit tracing), on the CPU.

The replacement model is the real model with every MLP's output replaced by its transcoder's reconstruction
plus an error term per layer and position (the real output minus the reconstruction), so at the prompt it
reproduces the real logits. Freezing the attention patterns and the norms' scales at their values in the real
run, and the feature activations, makes the rest of the model affine in what the nodes write:

    node outputs: input-token embeddings (resid_pre of block 0 per position), active features (activation
    times decoder row, written at their layer's MLP output), error terms (at the MLP output);
    node inputs:  features read their pre-activation (encoder row . the MLP's normalised input), logits
    read the model's logit at the last position.

An edge source -> target is the direct effect: how much the target's input changes when the source's output is
added in this frozen model (A[target, source]); with all sources removed what is left is the target's bias. The
edges come from batched backward passes (one row per target, the gradient read at every injection point).

Frozen attention runs through a registered transformers attention function that applies the recorded pattern
to the values (so models that dispatch their attention through transformers' AttentionInterface work: GPT-2,
Llama, NeoX, ...); frozen norms are hooks returning y0 + J (x - x0) with J the norm's Jacobian at a fixed scale.
Models whose MLP output is post-normed, scaled or read elsewhere are refused.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.dla import FrozenNorm
from desktop_app.engine.errors import OutOfMemory, SpecError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.model import human_bytes
from desktop_app.engine.replay import record_run, run_from_layer
from desktop_app.engine.results import AnalysisResult

FEATURE, ERROR, EMBEDDING, LOGIT = "feature", "error", "embedding", "logit"
_ATTN_NAME = "iwb_frozen_pattern"
_PATTERNS: dict[int, torch.Tensor] = {}  # id(attention module) -> recorded pattern [1, heads, query, key]


def _frozen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    pattern = _PATTERNS.get(id(module))
    if pattern is None:
        raise SpecError("internal: frozen attention was asked for a layer whose pattern was not recorded.")
    v = value
    if v.shape[1] != pattern.shape[1]:  # grouped-query attention: each kv head serves several query heads
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(pattern.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), pattern


def _register_attention():
    from transformers.modeling_utils import AttentionInterface

    if _ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _frozen_attention)


def check_supported(lm) -> None:
    a = lm.adapter
    problems = [what for what, bad in (
        ("its MLP output is post-normed", a.post_mlp_norm_name), ("its MLP output is read elsewhere", a.mlp_out_path),
        ("it scales sub-layer outputs", a.residual_multiplier != 1.0),
        ("it caps its logits with tanh", a.final_logit_softcap), ("it has a projection after the final norm",
                                                                   a.final_proj is not None)) if bad]
    if problems:
        raise SpecError(f"attribution graphs are not supported for this {a.family} model: {problems[0]}.")


def _norm_modules(lm) -> list[torch.nn.Module]:
    """Every norm of the blocks outside attention and MLP (those see only what is frozen or replaced), and the
    final norm."""
    a = lm.adapter
    found = []
    for L, block in enumerate(a.blocks):
        inner = {id(m) for sub in (a.attn(L), a.mlp(L)) for m in sub.modules()}
        found += [m for m in block.modules() if id(m) not in inner and m is not block
                  and ("Norm" in type(m).__name__ or isinstance(m, torch.nn.LayerNorm))]
    if a.final_norm_in_model:
        found.append(a.final_norm)
    return found


class _NormState:
    def __init__(self, module, x0: torch.Tensor, y0: torch.Tensor):
        fn = FrozenNorm(module, x0.reshape(-1, x0.shape[-1])[0])
        self.x0, self.y0 = x0, y0
        self.centred = fn.centred
        self.gain = fn.gain.float()
        eps = next((float(getattr(module, n)) for n in ("eps", "variance_epsilon", "epsilon")
                    if isinstance(getattr(module, n, None), (int, float))), 0.0)
        self.scale = torch.sqrt(self._centre(x0).pow(2).mean(-1, keepdim=True) + eps)
        rebuilt = self.gain * self._centre(x0) / self.scale + fn.bias.float()
        diff = float((rebuilt - y0).abs().max())
        if diff > 1e-4 * (1.0 + float(y0.abs().max())):
            raise SpecError(f"refused: the norm {type(module).__name__} is not a scaled LayerNorm / RMSNorm "
                            f"(rebuilding it with a frozen scale is off by {diff:.2g}).")

    def _centre(self, v):
        return v - v.mean(-1, keepdim=True) if self.centred else v

    def __call__(self, x):
        if x.dim() == self.x0.dim() - 1:  # the final norm on the last position only (run_from_layer last_only)
            x0, y0, scale = self.x0[:, -1], self.y0[:, -1], self.scale[:, -1]
        else:
            x0, y0, scale = self.x0, self.y0, self.scale
        return y0 + self.gain * self._centre(x - x0) / scale


class ReplacementContext:
    """Hooks for the three ways this module runs the model: `record` (the real run, keeping what is frozen),
    `replacement` (real attention and norms, MLPs replaced by transcoder + error), `frozen` (patterns, norm
    scales and MLP outputs fixed: affine in the embeddings and the injected MLP outputs)."""

    def __init__(self, lm, tset):
        self.lm, self.tset, self.a = lm, tset, lm.adapter
        self.mode = "record"
        self.norms = _norm_modules(lm)
        self.norm_io: dict[int, tuple] = {}
        self.norm_states: dict[int, _NormState] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        self.mlp_in0: list = [None] * len(self.a.blocks)
        self.mlp_out0: list = [None] * len(self.a.blocks)
        self.mlp_in: list = [None] * len(self.a.blocks)
        self.mlp_inject: list = [None] * len(self.a.blocks)  # frozen: what the MLP writes besides W_skip x
        self.errors: list = [None] * len(self.a.blocks)
        self.handles = []
        self.configs = []

    def __enter__(self):
        for m in self.norms:
            self.handles.append(m.register_forward_hook(self._norm_hook))
        for L in range(len(self.a.blocks)):
            self.handles.append(self.a.mlp(L).register_forward_hook(self._mlp_hook(L)))
            self.handles.append(self.a.attn(L).register_forward_hook(self._attn_hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self._attention("restore")
        for m in list(_PATTERNS):
            if m in self.patterns:
                _PATTERNS.pop(m, None)

    def _attention(self, what: str):
        if what == "freeze":
            _register_attention()
            _PATTERNS.update(self.patterns)
            for L in range(len(self.a.blocks)):
                cfg = getattr(self.a.attn(L), "config", None)
                if cfg is not None and all(cfg is not c for c, _ in self.configs):
                    self.configs.append((cfg, cfg._attn_implementation))
                    cfg._attn_implementation = _ATTN_NAME
        else:
            for cfg, impl in self.configs:
                cfg._attn_implementation = impl
            self.configs = []

    def _norm_hook(self, module, args, output):
        if self.mode == "record":
            self.norm_io[id(module)] = (args[0].detach().clone(), output.detach().clone())
            return None
        if self.mode == "frozen":
            return self.norm_states[id(module)](args[0])
        return None

    def _attn_hook(self, module, args, output):
        if self.mode == "record":
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if weights is None:
                raise SpecError("attribution graphs need eager attention (the pattern of each head); reload the model.")
            self.patterns[id(module)] = weights.detach().clone()
        return None

    def _mlp_hook(self, layer):
        def hook(_mod, args, output):
            x = args[0]
            if self.mode == "record":
                self.mlp_in0[layer] = x.detach().clone()
                self.mlp_out0[layer] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()
                return None
            self.mlp_in[layer] = x
            tc = self.tset.layers[layer]
            if self.mode == "replacement":
                new = tc(x) + self.errors[layer]
            else:
                new = self.mlp_inject[layer] + tc.skip(x)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def set_mode(self, mode: str):
        if mode == "frozen" and not self.norm_states:
            self.norm_states = {i: _NormState(m, *self.norm_io[id(m)]) for m in self.norms
                                for i in [id(m)]}
        self._attention("freeze" if mode == "frozen" else "restore")
        self.mode = mode


def _detached_run(run):
    """The recorded block arguments as ordinary tensors (recorded under inference mode, which autograd refuses)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple):
            return tuple(copy(x) for x in v)
        return v
    run.block_kwargs = [{k: copy(v) for k, v in kw.items()} for kw in run.block_kwargs]
    run.block_args = [tuple(copy(v) for v in args) for args in run.block_args]
    run.resid_pre = [r.clone() for r in run.resid_pre]
    return run


@dataclass
class Graph:
    node_kind: list[str]
    node_layer: np.ndarray  # features / errors: their layer; embeddings: -1; logits: n_layers
    node_pos: np.ndarray
    node_feature: np.ndarray  # features: the feature index; logits: the token id; embeddings: the token id
    activation: np.ndarray  # features: activation; logits: probability; else 0
    adjacency: np.ndarray  # [target, source] direct effects
    bias: np.ndarray  # per node: its input with every source removed (targets only)
    target_input: np.ndarray  # per node: its input in the real run (feature pre-activations, logits)
    logit_probs: np.ndarray
    real_logits: np.ndarray
    replacement_logits: np.ndarray

    @property
    def n(self) -> int:
        return len(self.node_kind)

    def node_ids(self) -> list[str]:
        """Ids as circuit-tracer / Neuronpedia write them: features `{layer}_{feature}_{pos}`, errors
        `{layer}_-1_{pos}`, embeddings `E_{token}_{pos}`, logits `{n_layers + 1}_{token}_{pos}`."""
        ids = []
        for k, L, p, f in zip(self.node_kind, self.node_layer, self.node_pos, self.node_feature):
            if k == FEATURE:
                ids.append(f"{L}_{f}_{p}")
            elif k == ERROR:
                ids.append(f"{L}_-1_{p}")
            elif k == EMBEDDING:
                ids.append(f"E_{f}_{p}")
            else:
                ids.append(f"{L + 1}_{f}_{p}")
        return ids


GRAPH_BYTES_PER_CELL = 48  # the float32 adjacency plus the float64 copies pruning makes (|A|, normalised, scores)


def estimate_bytes(n_nodes: int) -> int:
    return GRAPH_BYTES_PER_CELL * n_nodes * n_nodes


def default_budget() -> int:
    """Half the memory available now (the model and the rest of the app keep the other half)."""
    from desktop_app.engine.memory import available_bytes

    return available_bytes(torch.device("cpu")) // 2


def build_graph(lm, ids: torch.Tensor, tset, max_feature_nodes: int = 7500, max_n_logits: int = 10,
                desired_logit_prob: float = 0.95, batch_size: int = 32, memory_budget: int | None = None,
                cancel: CancelToken | None = None):
    """Job: yields Progress, returns (Graph, ReplacementContext-derived facts). See the module docstring."""
    cancel = cancel or CancelToken()
    check_supported(lm)
    if getattr(tset, "cross_layer", False):
        raise SpecError("cross-layer transcoders are not supported by attribution graphs yet; use a per-layer set.")
    n_layers = len(lm.adapter.blocks)
    if len(tset) != n_layers or tset.d_model != lm.info.d_model:
        raise SpecError(f"the transcoder set ({len(tset)} layers, d_model {tset.d_model}) does not fit this model "
                        f"({n_layers} layers, d_model {lm.info.d_model}).")
    ids = ids.reshape(1, -1)
    n_pos = ids.shape[1]
    total_steps = 3
    yield Progress(0, total_steps, "recording the real run")
    run = _detached_run(record_run(lm, ids, cancel=cancel))
    ctx = ReplacementContext(lm, tset)
    with ctx:
        with torch.no_grad():
            real = run_from_layer(lm, run, 0, run.resid_pre[0], cancel=cancel, last_only=False)[0]
        # features, errors
        feats = []  # (layer, pos, feature, activation)
        for L, tc in enumerate(tset.layers):
            x0, y0 = ctx.mlp_in0[L][0].float(), ctx.mlp_out0[L][0].float()
            with torch.no_grad():
                acts = tc.encode(x0)
                ctx.errors[L] = (y0 - tc.decode(acts, x0))[None]
            pos_i, feat_i = acts.nonzero(as_tuple=True)
            feats += [(L, int(p), int(f), float(acts[p, f])) for p, f in zip(pos_i, feat_i)]
        feats.sort(key=lambda t: -abs(t[3]) * float(tset.layers[t[0]].W_dec[t[2]].norm()))
        kept, dropped = feats[:max_feature_nodes], feats[max_feature_nodes:]
        errors_in_graph = [e[0].clone() for e in ctx.errors]  # [pos, d] per layer
        for L, p, f, a in dropped:  # features left out of the graph count as part of their error node
            errors_in_graph[L][p] += a * tset.layers[L].W_dec[f]
        kept.sort(key=lambda t: (t[0], t[1], t[2]))
        probs = torch.softmax(real[-1].double(), -1)
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        n_logits = min(max_n_logits, int((cum < desired_logit_prob).sum()) + 1)
        logit_tokens = order[:n_logits].tolist()

        n_f, n_e = len(kept), n_layers * n_pos
        n = n_f + n_e + n_pos + n_logits
        need = estimate_bytes(n)
        memory_budget = default_budget() if memory_budget is None else memory_budget
        if need > memory_budget:
            raise OutOfMemory(f"this graph would have {n} nodes and need about {human_bytes(need)}, over its "
                              f"budget of {human_bytes(memory_budget)}; shorten the prompt or lower "
                              "max_feature_nodes.")
        kind = [FEATURE] * n_f + [ERROR] * n_e + [EMBEDDING] * n_pos + [LOGIT] * n_logits
        layer = np.array([k[0] for k in kept] + [L for L in range(n_layers) for _ in range(n_pos)]
                         + [-1] * n_pos + [n_layers] * n_logits, dtype=np.int64)
        pos = np.array([k[1] for k in kept] + [p for _ in range(n_layers) for p in range(n_pos)]
                       + list(range(n_pos)) + [n_pos - 1] * n_logits, dtype=np.int64)
        tok = ids[0].tolist()
        feature = np.array([k[2] for k in kept] + [-1] * n_e + tok + logit_tokens, dtype=np.int64)
        activation = np.array([k[3] for k in kept] + [0.0] * (n_e + n_pos)
                              + [float(probs[t]) for t in logit_tokens], dtype=np.float64)

        # what each source writes, and where
        emb0 = run.resid_pre[0][0].detach().float()  # [pos, d]
        dec_scaled = torch.stack([a * tset.layers[L].W_dec[f] for L, p, f, a in kept]) if kept else \
            torch.zeros(0, emb0.shape[-1])
        f_layer = torch.tensor([k[0] for k in kept], dtype=torch.long)
        f_pos = torch.tensor([k[1] for k in kept], dtype=torch.long)
        inject0 = [(ctx.mlp_out0[L][0].float() - tset.layers[L].skip(ctx.mlp_in0[L][0].float())).detach()
                   for L in range(n_layers)]
        b_dec = [tset.layers[L].b_dec.float()[None].expand(n_pos, -1) for L in range(n_layers)]
        enc_rows = torch.stack([tset.layers[L].W_enc[f] for L, p, f, a in kept]) if kept else emb0[:0]
        b_enc = torch.tensor([float(tset.layers[L].b_enc[f]) for L, p, f, a in kept])

        groups = {}
        for i, (L, p, _f, _a) in enumerate(kept):
            groups.setdefault((L, p), []).append(i)
        groups = {key: (np.array(cols), dec_scaled[cols]) for key, cols in groups.items()}
        ctx.set_mode("frozen")
        targets = list(range(n_f)) + list(range(n - n_logits, n))
        adjacency = np.zeros((n, n), dtype=np.float32)
        bias = np.zeros(n, dtype=np.float64)
        target_input = np.zeros(n, dtype=np.float64)

        def frozen_forward(emb, inject):
            for L in range(n_layers):
                ctx.mlp_inject[L] = inject[L]
            logits = run_from_layer(lm, run, 0, emb, cancel=cancel, last_only=True)
            return logits, list(ctx.mlp_in)

        def inputs_of(rows, logits, mlp_in):
            vals = []
            for b, t in enumerate(rows):
                if t < n_f:
                    vals.append(mlp_in[f_layer[t]][b, f_pos[t]] @ enc_rows[t] + b_enc[t])
                else:
                    vals.append(logits[b, logit_tokens[t - (n - n_logits)]])
            return torch.stack(vals)

        yield Progress(1, total_steps, f"{n} nodes: {len(targets)} backward passes in batches of {batch_size}")
        for start in range(0, len(targets), batch_size):
            cancel.check()
            rows = targets[start:start + batch_size]
            B = len(rows)
            emb = emb0[None].expand(B, -1, -1).clone().requires_grad_(True)
            inject = [inject0[L][None].expand(B, -1, -1).clone().requires_grad_(True) for L in range(n_layers)]
            logits, mlp_in = frozen_forward(emb, inject)
            vals = inputs_of(rows, logits, mlp_in)
            grads = torch.autograd.grad(vals.sum(), [emb] + inject, allow_unused=True)
            g_emb = grads[0] if grads[0] is not None else torch.zeros_like(emb)
            g_mlp = torch.stack([g if g is not None else torch.zeros_like(emb) for g in grads[1:]])  # [L, B, pos, d]
            with torch.no_grad():
                r = np.array(rows)[:, None]
                for (L, p), (cols, dec) in groups.items():  # features written at one (layer, position) together
                    adjacency[r, cols[None]] = (g_mlp[L, :, p] @ dec.T).numpy()
                err = torch.stack(errors_in_graph)  # [L, pos, d]
                adjacency[np.array(rows)[:, None], n_f + np.arange(n_e)[None]] = \
                    torch.einsum("lbpd,lpd->blp", g_mlp, err).reshape(B, -1).numpy()
                adjacency[np.array(rows)[:, None], n_f + n_e + np.arange(n_pos)[None]] = \
                    torch.einsum("bpd,pd->bp", g_emb, emb0).numpy()
                target_input[rows] = vals.detach().double().numpy()
            yield Progress(1, total_steps, f"backward passes: {min(start + B, len(targets))} of {len(targets)}")
        with torch.no_grad():  # the biases: every source removed (one row serves every target)
            zero_emb = torch.zeros(1, n_pos, emb0.shape[-1])
            logits, mlp_in = frozen_forward(zero_emb, [b[None] for b in b_dec])
            for start in range(0, len(targets), batch_size):
                rows = targets[start:start + batch_size]
                bias[rows] = inputs_of(rows, logits.expand(len(rows), -1),
                                       [m.expand(len(rows), -1, -1) for m in mlp_in]).double().numpy()
        ctx.set_mode("replacement")
        with torch.no_grad():
            replaced = run_from_layer(lm, run, 0, run.resid_pre[0], cancel=cancel, last_only=True)[0]
        ctx.set_mode("record")
    yield Progress(2, total_steps, "pruning")
    graph = Graph(kind, layer, pos, feature, activation, adjacency, bias, target_input,
                  probs[logit_tokens].float().numpy(), real.detach().float().numpy(),
                  replaced.detach().float().numpy())
    return graph


# ---- influence, pruning, scores -------------------------------------------------------------------------------

def normalised(adjacency: np.ndarray) -> np.ndarray:
    w = np.abs(adjacency.astype(np.float64))
    s = w.sum(1, keepdims=True)
    return np.divide(w, s, out=np.zeros_like(w), where=s > 0)


def influence(weights: np.ndarray, logit_weights: np.ndarray) -> np.ndarray:
    """Total (all paths) influence of each node on the logits: w (W + W^2 + ...), W the row-normalised |A|."""
    x, total = logit_weights.astype(np.float64), np.zeros(len(logit_weights))
    for _ in range(len(logit_weights)):
        x = x @ weights
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


def prune(graph: Graph, node_threshold: float, edge_threshold: float):
    """(node mask, edge mask [target, source]): features covering node_threshold of the feature influence (errors,
    embeddings and logits always kept), then edges covering edge_threshold of the edge influence among them."""
    kinds = np.array(graph.node_kind)
    lw = _logit_weights(graph)
    infl = influence(normalised(graph.adjacency), lw)
    is_f = kinds == FEATURE
    node_mask = ~is_f
    node_mask[np.where(is_f)[0][smallest_covering(infl[is_f], node_threshold)]] = True
    a = graph.adjacency * node_mask[:, None] * node_mask[None, :]
    w = normalised(a)
    edge_scores = w * (influence(w, lw) + lw)[:, None]
    flat = smallest_covering(edge_scores.ravel(), edge_threshold)
    edge_mask = flat.reshape(a.shape) & (a != 0)
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
    non_error = 1.0 - w[:, kinds == ERROR].sum(1)
    weight = infl + lw
    has_input = w.sum(1) > 0
    completeness = float((weight * non_error)[has_input].sum() / weight[has_input].sum())
    return replacement, completeness


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
    adj = (graph.adjacency * edge_mask)[np.ix_(keep, keep)]
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
