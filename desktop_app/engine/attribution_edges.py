"""The nodes and edges of an attribution graph, by batched backward passes through the frozen replacement model.

    node outputs: input-token embeddings (resid_pre of block 0 per position), active features (activation
    times decoder row, written at their layer's MLP output), error terms (at the MLP output);
    node inputs:  features read their pre-activation (encoder row . the MLP's normalised input), logits
    read the model's logit at the last position.

An edge source -> target is the direct effect: how much the target's input changes when the source's output is
added in the frozen model (A[target, source]); with all sources removed what is left is the target's bias.

The frozen model runs forward once on `batch_size` identical rows and keeps its autograd graph; each backward pass
then seeds one target per row (a feature's encoder row at its MLP input, or a one-hot logit) and reads the
gradient at every source's injection point. Targets are taken in layer order, so a pass stops below the highest
layer it reads. Only the rows of features that become nodes are computed: logits first, then the features in order
of their influence on the logits estimated from the rows so far (re-ranked every few passes), up to
max_feature_nodes. Features left out count as part of their error node: their columns are added to it, which is
exact because the frozen model is linear.

Cross-layer transcoders (circuit-tracer CLTs): a feature read at layer s writes activation x W_dec[s][f, l - s] into
the MLP output of every layer l >= s, so its edge to a target sums its writes against the target's gradient at each
of those layers; layer l's error is its MLP output minus b_dec[l] and every active feature's write into it. A
left-out CLT feature is folded into the error node of the layer and position it reads at (with all its writes).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from desktop_app.engine.attribution_replacement import (ReplacementContext, _detached_run, b_dec_of, check_reproduces,
                                                        check_supported, is_cross_layer, skip_of)
from desktop_app.engine.errors import OutOfMemory
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.model import human_bytes
from desktop_app.engine.replay import record_run, run_from_layer

FEATURE, ERROR, EMBEDDING, LOGIT = "feature", "error", "embedding", "logit"
RERANK_EVERY = 4  # backward passes between re-rankings of the features not yet visited


@dataclass
class Graph:
    node_kind: list[str]
    node_layer: np.ndarray  # features / errors: their layer; embeddings: -1; logits: n_layers
    node_pos: np.ndarray
    node_feature: np.ndarray  # features: the feature index; logits: the token id; embeddings: the token id
    activation: np.ndarray  # features: activation; logits: probability; else 0
    adjacency: np.ndarray  # [target, source] direct effects, float32
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


GRAPH_BYTES_PER_CELL = 16  # the float32 adjacency plus pruning's float32 working arrays (|A| normalised, scores)


def estimate_bytes(n_nodes: int, n_active: int = 0, n_rows: int = 0) -> int:
    """Peak bytes of a graph of n_nodes; when features are left out (n_active > the features kept), the rows
    computed against every active feature (n_rows x columns, float32) are held beside the adjacency."""
    extra = 4 * n_rows * (n_nodes + n_active) if n_rows else 0
    return GRAPH_BYTES_PER_CELL * n_nodes * n_nodes + extra


def default_budget() -> int:
    """Half the memory available now (the model and the rest of the app keep the other half)."""
    from desktop_app.engine.memory import available_bytes

    return available_bytes(torch.device("cpu")) // 2


@dataclass
class ActiveFeatures:
    """A prompt's active transcoder features in (layer, position, feature) order."""
    layer: torch.Tensor  # [n] long
    pos: torch.Tensor  # [n] long
    feature: torch.Tensor  # [n] long
    activation: torch.Tensor  # [n] float32
    dec_scaled: torch.Tensor  # [n, d] activation x decoder row: what the feature writes at its MLP output
    enc: torch.Tensor  # [n, d] encoder rows
    b_enc: torch.Tensor  # [n]
    layer_bounds: list[tuple[int, int]]  # per layer, its features' index range
    groups: list[tuple[int, int, int, int]]  # (layer, position, lo, hi): the features written at one place
    # cross-layer sets: per read layer s, [n_s, n_layers - s, d]: activation x decoder row written into layer s + j
    # (dec_scaled is then the j = 0 slice)
    dec_cross: list[torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.layer)


def active_features(tset, mlp_in0, mlp_out0) -> tuple[ActiveFeatures, list[torch.Tensor]]:
    """Every layer's active features at every position of the real run, and each layer's error [pos, d] (the MLP's
    output minus the transcoder's reconstruction). Reads only the decoder rows of the features that are active."""
    if is_cross_layer(tset):
        return _active_cross_layer(tset, mlp_in0, mlp_out0)
    parts, errors, bounds, start = [], [], [], 0
    for L, tc in enumerate(tset.layers):
        x0, y0 = mlp_in0[L][0].float(), mlp_out0[L][0].float()
        with torch.no_grad():
            acts = tc.encode(x0)
            pos, feat = acts.nonzero(as_tuple=True)  # row-major: by position, then feature
            used = torch.unique(feat)
            rows = tset.decoder_rows(L, used) if len(used) else torch.zeros(0, x0.shape[-1])
            recon = acts[:, used] @ rows + tc.b_dec.float() + tc.skip(x0)
            a = acts[pos, feat].float()
            parts.append((torch.full_like(pos, L), pos, feat, a, a[:, None] * rows[torch.searchsorted(used, feat)],
                          tc.W_enc[feat].float(), tc.b_enc[feat].float()))
        errors.append(y0 - recon)
        bounds.append((start, start + len(pos)))
        start += len(pos)
    return _collect(parts, bounds), errors


def _collect(parts, bounds, dec_cross=None) -> ActiveFeatures:
    cat = [torch.cat([p[i] for p in parts]) for i in range(7)]
    groups = []
    for L, (lo, hi) in enumerate(bounds):
        positions, counts = torch.unique_consecutive(cat[1][lo:hi], return_counts=True)
        ends = lo + torch.cumsum(counts, 0)
        groups += [(L, int(p), int(e - c), int(e)) for p, c, e in zip(positions, counts, ends)]
    return ActiveFeatures(*cat, bounds, groups, dec_cross)


def _active_cross_layer(clt, mlp_in0, mlp_out0) -> tuple[ActiveFeatures, list[torch.Tensor]]:
    """As active_features, for a cross-layer set: layer l's error is its MLP output minus b_dec[l] and what the
    features read at every layer s <= l write into it."""
    n_layers = len(clt)
    parts, bounds, dec_cross, start = [], [], [], 0
    recon = [clt.b_dec[L].float()[None].expand_as(mlp_out0[L][0]).clone() for L in range(n_layers)]
    with torch.no_grad():
        for s in range(n_layers):
            acts = clt.encode(s, mlp_in0[s][0].float())
            pos, feat = acts.nonzero(as_tuple=True)  # row-major: by position, then feature
            for j in range(n_layers - s):
                recon[s + j] += acts @ clt.W_dec[s][:, j].float()
            a = acts[pos, feat].float()
            scaled = a[:, None, None] * clt.W_dec[s][feat].float()  # [n_s, n_layers - s, d]
            dec_cross.append(scaled)
            parts.append((torch.full_like(pos, s), pos, feat, a, scaled[:, 0], clt.W_enc[s][feat].float(),
                          clt.b_enc[s][feat].float()))
            bounds.append((start, start + len(pos)))
            start += len(pos)
    errors = [mlp_out0[L][0].float() - recon[L] for L in range(n_layers)]
    return _collect(parts, bounds, dec_cross), errors


class FrozenBackward:
    """The frozen model run forward once on `rows` identical copies of the prompt, its autograd graph kept for
    any number of backward passes; a pass seeds one target per row and returns every source's gradient."""

    def __init__(self, lm, run, ctx: ReplacementContext, emb0: torch.Tensor, inject0: list[torch.Tensor], rows: int,
                 cancel: CancelToken):
        self.rows = rows
        self.emb = emb0[None].repeat(rows, 1, 1).requires_grad_(True)
        self.inject = [i[None].repeat(rows, 1, 1).requires_grad_(True) for i in inject0]
        ctx.mlp_inject = list(self.inject)
        with torch.enable_grad():
            self.logits = run_from_layer(lm, run, 0, self.emb, cancel=cancel, last_only=True)
        self.mlp_in = list(ctx.mlp_in)

    def backward(self, seeds: dict[int, torch.Tensor], logit_seed: torch.Tensor | None):
        """(gradient at the embeddings [rows, pos, d], per layer the gradient at its MLP output or None) of
        sum over rows of (seeds[L][row] . MLP input of layer L) + (logit_seed[row] . logits)."""
        outputs, grads = [], []
        for L, s in seeds.items():
            outputs.append(self.mlp_in[L])
            grads.append(s)
        top = max(seeds, default=0)
        if logit_seed is not None:
            outputs.append(self.logits)
            grads.append(logit_seed)
            top = len(self.inject)
        inputs = [self.emb] + self.inject[:top]  # MLP outputs at layer >= top cannot reach what is read
        got = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, allow_unused=True)
        return got[0], list(got[1:]) + [None] * (len(self.inject) - top)


def _write_rows(out: torch.Tensor, g_emb, g_mlp, feats: ActiveFeatures, errors, emb0: torch.Tensor):
    """Direct effects of every source on the targets of a pass: out [targets, n_active + n_err + n_pos] (features
    in active order, then errors layer-major, then embeddings)."""
    b = out.shape[0]
    n_active, n_pos = len(feats), emb0.shape[0]
    if feats.dec_cross is not None:  # a cross-layer feature: the sum over every layer it writes into
        for L, p, lo, hi in feats.groups:
            first = feats.layer_bounds[L][0]
            for j in range(len(g_mlp) - L):
                if g_mlp[L + j] is not None:
                    out[:, lo:hi] += g_mlp[L + j][:b, p] @ feats.dec_cross[L][lo - first:hi - first, j].T
    for L, p, lo, hi in (feats.groups if feats.dec_cross is None else ()):
        if g_mlp[L] is not None:
            out[:, lo:hi] = g_mlp[L][:b, p] @ feats.dec_scaled[lo:hi].T
    for L, g in enumerate(g_mlp):
        if g is None:
            continue
        g = g[:b]
        c = n_active + L * n_pos
        out[:, c:c + n_pos] = torch.einsum("bpd,pd->bp", g, errors[L])
    c = n_active + len(g_mlp) * n_pos
    out[:, c:c + n_pos] = torch.einsum("bpd,pd->bp", g_emb[:b], emb0)


def partial_influence(rows: torch.Tensor, row_col: torch.Tensor, row_weight: torch.Tensor,
                      chunk: int = 2048) -> torch.Tensor:
    """Influence of every column on the logits through the rows known so far: w (W + W^2 + ...) with W the
    row-normalised |rows|, starting from row_weight (the logit rows' probabilities); a row's node is column
    row_col (-1 for logits). The rows of a partial graph still form a DAG, so this ends."""
    k, n_cols = rows.shape
    scale = torch.cat([rows[a:a + chunk].abs().sum(1) for a in range(0, k, chunk)]).clamp_min(1e-30).reciprocal()
    x_rows, total = row_weight.clone(), torch.zeros(n_cols, dtype=torch.float64)
    for _ in range(k + 1):
        x = torch.zeros(n_cols, dtype=torch.float64)
        for a in range(0, k, chunk):
            x += ((x_rows[a:a + chunk] * scale[a:a + chunk]) @ rows[a:a + chunk].abs()).double()
        if not torch.any(x):
            break
        total += x
        x_rows = torch.where(row_col >= 0, x[row_col.clamp_min(0)], torch.zeros(())).float()
    return total


def build_graph(lm, ids: torch.Tensor, tset, max_feature_nodes: int = 7500, max_n_logits: int = 10,
                desired_logit_prob: float = 0.95, batch_size: int = 64, memory_budget: int | None = None,
                cancel: CancelToken | None = None):
    """Job: yields Progress, returns the Graph of the prompt `ids` (see the module docstring)."""
    cancel = cancel or CancelToken()
    check_supported(lm, tset)
    n_layers = len(lm.adapter.blocks)
    ids = ids.reshape(1, -1)
    n_pos = ids.shape[1]
    total_steps = 3
    yield Progress(0, total_steps, "recording the real run")
    run = _detached_run(record_run(lm, ids, cancel=cancel))
    ctx = ReplacementContext(lm, tset, gradient_only=True)
    with ctx:
        with torch.no_grad():
            real = run_from_layer(lm, run, 0, run.resid_pre[0], cancel=cancel, last_only=False)[0]
        feats, errors = active_features(tset, ctx.mlp_in0, ctx.mlp_out0)
        ctx.errors = [e[None] for e in errors]
        probs = torch.softmax(real[-1].double(), -1)
        order = torch.argsort(probs, descending=True)
        cum = torch.cumsum(probs[order], 0)
        n_logits = min(max_n_logits, int((cum < desired_logit_prob).sum()) + 1)
        logit_tokens = order[:n_logits].tolist()

        n_active = len(feats)
        n_f, n_e = min(max(max_feature_nodes, 0), n_active), n_layers * n_pos
        n = n_f + n_e + n_pos + n_logits
        all_kept = n_f == n_active
        memory_budget = default_budget() if memory_budget is None else memory_budget
        # the kept forward pass holds about 8 float32 [pos, d_model] tensors per layer and row: rows within a quarter
        # of the budget
        per_row = 32 * n_layers * n_pos * lm.info.d_model
        batch_size = max(1, min(batch_size, n_logits + n_f, memory_budget // 4 // per_row))
        need = estimate_bytes(n, n_active, 0 if all_kept else n_f + n_logits) + batch_size * per_row
        if feats.dec_cross is not None:  # a CLT feature's writes into every later layer, held for the passes
            need += 4 * sum(t.numel() for t in feats.dec_cross)
        if need > memory_budget:
            raise OutOfMemory(f"this graph would have {n} nodes and need about {human_bytes(need)}, over its "
                              f"budget of {human_bytes(memory_budget)}; shorten the prompt or lower "
                              "max_feature_nodes.")
        emb0 = run.resid_pre[0][0].detach().float()  # [pos, d]
        inject0 = [(ctx.mlp_out0[L][0].float() - skip_of(tset, L, ctx.mlp_in0[L][0].float())).detach()
                   for L in range(n_layers)]
        ctx.set_mode("frozen")
        n_cols = n_active + n_e + n_pos
        # all features kept: rows go straight into the adjacency (slot = node); else into rows in visit order
        buf = torch.zeros((n, n) if all_kept else (n_logits + n_f, n_cols), dtype=torch.float32)
        slot_of_logit = [(n - n_logits if all_kept else 0) + i for i in range(n_logits)]
        row_col = torch.full((buf.shape[0],), -1, dtype=torch.long)
        visited = torch.zeros(n_active, dtype=torch.bool)
        n_rows_total = n_logits + n_f
        yield Progress(1, total_steps, f"{n} nodes: {n_rows_total} target rows, {batch_size} per backward pass")
        frozen = FrozenBackward(lm, run, ctx, emb0, inject0, batch_size, cancel)
        check_reproduces(frozen.logits[0].detach().numpy(), real[-1].numpy(), "the graph's frozen model")
        d_model, vocab = emb0.shape[-1], frozen.logits.shape[-1]
        done = 0

        def run_pass(targets: list[int], slots: list[int]):
            """targets: active feature indices, or -1 - i for logit i."""
            nonlocal done
            cancel.check()
            seeds: dict[int, torch.Tensor] = {}
            logit_seed = None
            for row, t in enumerate(targets):
                if t < 0:
                    if logit_seed is None:
                        logit_seed = torch.zeros(batch_size, vocab)
                    logit_seed[row, logit_tokens[-1 - t]] = 1.0
                else:
                    L = int(feats.layer[t])
                    if L not in seeds:
                        seeds[L] = torch.zeros(batch_size, n_pos, d_model)
                    seeds[L][row, feats.pos[t]] = feats.enc[t]
            g_emb, g_mlp = frozen.backward(seeds, logit_seed)
            rows = torch.zeros(len(targets), n_cols)
            _write_rows(rows, g_emb, g_mlp, feats, errors, emb0)
            buf[torch.tensor(slots), :n_cols] = rows
            done += len(targets)

        logit_targets = [-1 - i for i in range(n_logits)]
        for a in range(0, n_logits, batch_size):
            run_pass(logit_targets[a:a + batch_size], slot_of_logit[a:a + batch_size])
            yield Progress(1, total_steps, f"edges: {done} of {n_rows_total} target rows")
        next_slot = n_logits
        row_weight = torch.zeros(buf.shape[0])
        row_weight[torch.tensor(slot_of_logit, dtype=torch.long)] = probs[logit_tokens].float()
        while int(visited.sum()) < n_f:
            if all_kept:
                queue = torch.arange(n_active)  # already in layer order
            else:
                infl = partial_influence(buf[:next_slot], row_col[:next_slot], row_weight[:next_slot])[:n_active]
                infl[visited] = -1.0
                want = min(RERANK_EVERY * batch_size, n_f - int(visited.sum()))
                queue = torch.sort(torch.argsort(infl, descending=True, stable=True)[:want]).values
            for a in range(0, len(queue), batch_size):
                chunk = queue[a:a + batch_size].tolist()
                if all_kept:
                    slots = chunk
                else:
                    slots = list(range(next_slot, next_slot + len(chunk)))
                    row_col[slots] = torch.tensor(chunk)
                    next_slot += len(chunk)
                run_pass(chunk, slots)
                visited[chunk] = True
                yield Progress(1, total_steps, f"edges: {done} of {n_rows_total} target rows")
        with torch.no_grad():
            target_input = _inputs(feats, frozen.logits[:1], [m[:1] if m is not None else None for m in frozen.mlp_in],
                                   logit_tokens)
        del frozen
        with torch.no_grad():  # the biases: every source removed, one forward pass
            ctx.mlp_inject = [b_dec_of(tset, L)[None, None].expand(1, n_pos, -1) for L in range(n_layers)]
            logits = run_from_layer(lm, run, 0, torch.zeros(1, n_pos, d_model), cancel=cancel, last_only=True)
            bias_all = _inputs(feats, logits, list(ctx.mlp_in), logit_tokens)
        ctx.set_mode("replacement")
        with torch.no_grad():
            replaced = run_from_layer(lm, run, 0, run.resid_pre[0], cancel=cancel, last_only=True)[0]
        ctx.set_mode("record")

    kept = torch.nonzero(visited).reshape(-1)
    if all_kept:
        adjacency = buf.numpy()
    else:
        adjacency = _assemble(buf, row_col, kept, feats, n, n_e, n_pos, n_logits)
    del buf
    node_rows = torch.cat([kept, n_active + torch.arange(n_logits)])
    target_input_n, bias_n = np.zeros(n), np.zeros(n)
    target_input_n[list(range(n_f)) + list(range(n - n_logits, n))] = target_input[node_rows].numpy()
    bias_n[list(range(n_f)) + list(range(n - n_logits, n))] = bias_all[node_rows].numpy()
    kind = [FEATURE] * n_f + [ERROR] * n_e + [EMBEDDING] * n_pos + [LOGIT] * n_logits
    layer = np.concatenate([feats.layer[kept].numpy(), np.repeat(np.arange(n_layers), n_pos),
                            np.full(n_pos, -1), np.full(n_logits, n_layers)]).astype(np.int64)
    pos = np.concatenate([feats.pos[kept].numpy(), np.tile(np.arange(n_pos), n_layers), np.arange(n_pos),
                          np.full(n_logits, n_pos - 1)]).astype(np.int64)
    feature = np.concatenate([feats.feature[kept].numpy(), np.full(n_e, -1), ids[0].numpy(),
                              np.array(logit_tokens, dtype=np.int64)]).astype(np.int64)
    activation = np.concatenate([feats.activation[kept].double().numpy(), np.zeros(n_e + n_pos),
                                 probs[logit_tokens].numpy()])
    yield Progress(2, total_steps, "pruning")
    return Graph(kind, layer, pos, feature, activation, adjacency, bias_n, target_input_n,
                 probs[logit_tokens].float().numpy(), real.detach().float().numpy(), replaced.detach().float().numpy())


def _inputs(feats: ActiveFeatures, logits: torch.Tensor, mlp_in: list, logit_tokens: list[int]) -> torch.Tensor:
    """Every active feature's input (encoder row . its MLP input + b_enc), then every logit node's logit, float64,
    read from row 0 of a forward pass of the frozen model."""
    vals = torch.zeros(len(feats) + len(logit_tokens), dtype=torch.float64)
    for L, (lo, hi) in enumerate(feats.layer_bounds):
        if hi > lo:
            x = mlp_in[L][0].detach().float()[feats.pos[lo:hi]]
            vals[lo:hi] = ((x * feats.enc[lo:hi]).sum(-1) + feats.b_enc[lo:hi]).double()
    vals[len(feats):] = logits[0, logit_tokens].detach().double()
    return vals


def _assemble(buf: torch.Tensor, row_col: torch.Tensor, kept: torch.Tensor, feats: ActiveFeatures, n: int,
              n_e: int, n_pos: int, n_logits: int, chunk: int = 4096) -> np.ndarray:
    """The [node, node] adjacency from rows in visit order over every active feature's column: the kept features'
    columns, and each left-out feature's column added to its error node's."""
    n_active, n_f = len(feats), len(kept)
    cols = torch.cat([kept, n_active + torch.arange(n_e + n_pos)])
    adjacency = torch.zeros(n, n, dtype=torch.float32)
    node_of_row = torch.empty(buf.shape[0], dtype=torch.long)
    is_logit = row_col < 0
    node_of_row[is_logit] = n - n_logits + torch.arange(int(is_logit.sum()))
    node_of_row[~is_logit] = torch.searchsorted(kept, row_col[~is_logit])
    block = buf[:, cols]
    dropped = torch.nonzero(~torch.isin(torch.arange(n_active), kept)).reshape(-1)
    err_col = n_f + feats.layer * n_pos + feats.pos
    for a in range(0, len(dropped), chunk):
        d = dropped[a:a + chunk]
        block.index_add_(1, err_col[d], buf[:, d])
    adjacency[node_of_row, :block.shape[1]] = block
    return adjacency.numpy()
