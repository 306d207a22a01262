"""Activation patching over a dataset of pairs, with the pairs batched together with the cells.

Pairs go in blocks. For a block, each prompt is recorded once (`replay.record_run`: every block's input, its
keys and values, its arguments). Then, per layer, every (pair, cell) becomes one row; rows of pairs whose
patched prompt has the same token length share one batch: each row starts at the patched layer from its own
pair's recorded state (the layers before are never recomputed), and at the first position its patch changes,
with its own pair's recorded keys and values for the positions before (a causal model leaves them as they
were). Rows whose patch would replace an activation by an identical one (a position where both prompts agree)
need no forward pass, nor do patches in the last block (but resid_pre) at other positions than the last one.
What reaches the metric is computed and nothing else, each shortcut checked numerically on the model first
(replay.py) and skipped where it does not hold: the last block computes the keys and values of the earlier
positions and the last position alone (`last_block_check`); a head_out row does not recompute the patched
layer's attention, whose output is the output projection of the patched hook_z (`given_attention_check`); a
metric of logits alone (logit_diff, expressions without logprob / prob) unembeds only its tokens (`_Columns`).

Cells are positions by index ("each": every prompt of the dataset has the same token length), all positions
at once ("all"), or named positions ("named": IO, S1, S2, END ... from a template), where each pair patches
the role's position in the source prompt into the same role's position in the target prompt, so pairs of
different lengths line up by role.
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from desktop_app.engine.capture import hooks
from desktop_app.engine.dataset_runner import _check_positions
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.memory import RowBudget, chunks_shrinking_on_oom, rows_per_batch
from desktop_app.engine.pair_metrics import (DatasetMetric, finish_dataset_result, padded_tokens, position_labels,
                                             running_mean)
from desktop_app.engine.patching import _source_reads, validate
from desktop_app.engine.conformance import checks_for_component, prefix_reuse_ok, require
from desktop_app.engine.metric_expr import BoundMetric, TokenSets
from desktop_app.engine.adapters import block_output_tensor
from desktop_app.engine.replay import (RecordedRun, can_start_later, given_attention_check, last_block_check,
                                       record_run, run_block_given_attention, run_rows, unembed_columns)
from desktop_app.engine.results import AnalysisResult, empty_values

POSITION_MODES = ("each", "all", "named")


def _act(run: RecordedRun, component: str, layer: int) -> torch.Tensor:
    if component == "resid_pre":
        return run.resid_pre[layer]
    if component == "resid_post":
        return run.resid_post(layer)
    return run.acts[hook_name(layer, "attn.hook_z" if component == "head_out" else component)]


@dataclasses.dataclass
class _Row:
    pair: int  # index within the block
    cell: tuple  # index into the result's cells of one layer (position slot, head)
    t: int  # target position (-1: all)
    s: int  # source position (-1: all)
    head: int  # -1: no head
    start: int  # first position the row computes


class _Grid:
    """The cells of one layer: (position slot, head) with per pair (target position, source position)."""

    def __init__(self, component: str, mode: str, n_pos: int, names: list[str], n_heads: int, direction: str):
        self.component, self.mode, self.names, self.direction = component, mode, names, direction
        self.slots = n_pos if mode == "each" else len(names) if mode == "named" else 1
        self.heads = n_heads if component == "head_out" else 0

    def dims(self) -> list[str]:
        dims = ["layer"] + (["position"] if self.mode != "all" else [])
        return dims + (["head"] if self.heads else [])

    def shape(self, n_layers: int) -> tuple:
        sizes = {"layer": n_layers, "position": self.slots, "head": self.heads}
        return tuple(sizes[d] for d in self.dims())

    def cells(self):
        return [(p, h) for p in range(self.slots) for h in (range(self.heads) if self.heads else [-1])]

    def positions(self, pair, slot: int) -> tuple[int, int]:
        """(target position, source position) of a slot for one pair."""
        if self.mode == "each":
            return slot, slot
        if self.mode == "all":
            return -1, -1
        c, k = pair.positions[self.names[slot]]
        return (k, c) if self.direction == "denoise" else (c, k)

    def index(self, layer_row: int, cell) -> tuple:
        slot, head = cell
        return (layer_row,) + ((slot,) if self.mode != "all" else ()) + ((head,) if self.heads else ())


def _check_mode(data, mode: str) -> None:
    if mode not in POSITION_MODES:
        raise SpecError(f"positions must be one of {', '.join(POSITION_MODES)}, not {mode!r}.")
    _check_positions(data, mode, both_prompts=mode == "all")


def dataset_patching_job(lm, data, component: str = "resid_pre", positions: str = "each",
                         direction: str = "denoise", metric="logit_diff_recovered", name: str = "patching",
                         layers=None, cancel: CancelToken | None = None, batch_size: int | None = None,
                         pairs_per_block: int = 32):
    """Activation patching of every pair of `data` (a datasets.TokenizedDataset); returns the dataset result:
    values (mean over pairs), extras values_per_pair [pair, ...dims], sem, clean_metric / corrupted_metric [pair]."""
    cancel = cancel or CancelToken()
    layers = validate(component, direction, "logit_diff", lm, layers)
    _check_mode(data, positions)
    require(lm, *checks_for_component(component), analysis=f"activation patching of {component} over a dataset")
    measure = DatasetMetric(lm, metric, data.pairs)
    t0 = time.perf_counter()
    n_pos = len(data.pairs[0].clean.ids)
    grid = _Grid(component, positions, n_pos, data.position_names, lm.info.n_heads, direction)
    shape = grid.shape(len(layers))
    labels = {"layer": [str(L) for L in layers]}
    if positions == "each":
        labels["position"] = position_labels([p.clean for p in data.pairs])
    elif positions == "named":
        labels["position"] = list(data.position_names)
    if grid.heads:
        labels["head"] = [str(h) for h in range(grid.heads)]
    result = AnalysisResult(
        name=name, kind="activation_patching",
        params=dict(component=component, positions=positions, direction=direction, metric=measure.label,
                    pairs=len(data)),
        dims=grid.dims(), values=empty_values(shape), labels=labels,
        tokens_clean=padded_tokens([p.clean for p in data.pairs]),
        tokens_corrupted=padded_tokens([p.corrupted for p in data.pairs]))
    P = len(data)
    per_pair = np.full((P,) + shape, np.nan, dtype=np.float32)
    clean_raw = np.full(P, np.nan, dtype=np.float32)
    corrupted_raw = np.full(P, np.nan, dtype=np.float32)
    zero_pairs: set[int] = set()
    total = P * int(np.prod(shape))
    yield Progress(0, total, "recording the clean and corrupted runs")

    def cells():
        done = 0
        budget = RowBudget(batch_size or rows_per_batch(lm, n_pos))
        with torch.inference_mode():
            for first in range(0, P, pairs_per_block):
                block = list(range(first, min(P, first + pairs_per_block)))
                events = _sweep_block(lm, data, block, grid, layers, direction, measure, per_pair, clean_raw,
                                      corrupted_raw, zero_pairs, budget, cancel)
                for event in events:
                    done += event
                    yield Progress(done, total, f"pairs {block[0]}-{block[-1]}")
                end = block[-1] + 1
                result.values = running_mean(per_pair[:end], clean_raw[:end], corrupted_raw[:end],
                                             measure.normalised).reshape(shape)
                index = tuple(np.array(ix) for ix in np.indices(shape).reshape(len(shape), -1))
                yield Partial(index=index, values=result.values[index].copy())
    out = yield from stream_cells(result, cells(), t0)
    finish_dataset_result(out, per_pair, clean_raw, corrupted_raw, measure.normalised, zero_pairs)
    out.elapsed_s = time.perf_counter() - t0
    return out


def record_batch(lm, id_lists, reads, cancel=None) -> list[RecordedRun]:
    """record_run for prompts of one token length in one batched forward pass (a batch-1 pass is bound by
    reading the weights, so one pass per prompt costs nearly as much as one for all). The block arguments
    (masks, rotary tables) come from a batch-1 record of the first prompt, so that restarts broadcast them
    over any number of rows as single-pair sweeps do; logits only at the last position."""
    from desktop_app.engine.capture import as_ids
    from desktop_app.engine.replay import _cache_tensors, _full_cache

    template = record_run(lm, id_lists[0], reads, cancel)
    if len(id_lists) == 1:
        return [template]
    n = lm.info.n_layers
    last = hook_name(n - 1, "resid_post")
    names = [hook_name(L, "resid_pre") for L in range(n)] + [last] + list(reads)
    ids = torch.tensor(id_lists, dtype=torch.long, device=lm.input_device)
    with torch.inference_mode(), hooks(lm, read=names, cancel=cancel) as store:
        try:  # a full-length cache, as record_run keeps (sliding-window layers keep only their window otherwise)
            out = lm.model(input_ids=ids, use_cache=True, cache=_full_cache(), logits_to_keep=1)
        except TypeError:
            out = lm.model(input_ids=ids, use_cache=True)
    kv = _cache_tensors(getattr(out, "cache", None), n, len(id_lists[0]))
    logits = out.logits[:, -1].float().cpu()
    runs = []
    for i, row in enumerate(id_lists):
        runs.append(dataclasses.replace(
            template, ids=as_ids(row), logits_last=logits[i],
            resid_pre=[store[hook_name(L, "resid_pre")][i:i + 1] for L in range(n)],
            prefix_kv=None if kv is None or template.prefix_kv is None else [(k[i:i + 1], v[i:i + 1]) for k, v in kv],
            acts={name: store[name][i:i + 1] for name in [last, *reads]}))
    return runs


def _record_block(lm, data, block, component, direction, cancel):
    """Target and source runs of the block's pairs; prompts of one length are recorded in one batch."""
    reads = _source_reads(component, lm.info.n_layers)
    prompts = []  # (pair position in block, 0 clean / 1 corrupted, ids)
    for j, i in enumerate(block):
        pair = data.pairs[i]
        prompts += [(j, 0, list(pair.clean.ids)), (j, 1, list(pair.corrupted.ids))]
    by_length: dict[int, list] = {}
    for entry in prompts:
        by_length.setdefault(len(entry[2]), []).append(entry)
    runs = {}
    for entries in by_length.values():
        for entry, run in zip(entries, record_batch(lm, [e[2] for e in entries], reads, cancel)):
            runs[entry[:2]] = run
    clean = [runs[(j, 0)] for j in range(len(block))]
    corrupted = [runs[(j, 1)] for j in range(len(block))]
    return (corrupted, clean) if direction == "denoise" else (clean, corrupted)


def _sweep_block(lm, data, block, grid: _Grid, layers, direction, measure: DatasetMetric, per_pair, clean_raw,
                 corrupted_raw, zero_pairs, budget, cancel):
    """Fill per_pair for the pairs of `block`; yields the number of cells finished after each chunk."""
    targets, sources = _record_block(lm, data, block, grid.component, direction, cancel)
    clean_runs, corrupted_runs = (sources, targets) if direction == "denoise" else (targets, sources)
    block_t = torch.tensor(block)
    clean_logits = torch.stack([r.logits_last for r in clean_runs])
    clean_logprobs = torch.log_softmax(clean_logits, -1)
    for raw_of, runs in ((clean_raw, clean_runs), (corrupted_raw, corrupted_runs)):
        vals, zero = measure.raw(torch.stack([r.logits_last for r in runs]), block_t, clean_logprobs)
        raw_of[block] = vals.numpy()
        zero_pairs.update(int(block[i]) for i in torch.nonzero(zero).flatten().tolist())
    target_logits = torch.stack([r.logits_last for r in targets])
    unpatched = measure.raw(target_logits, block_t, clean_logprobs)[0].numpy()
    groups: dict[int, list[int]] = {}
    for local, run in enumerate(targets):
        groups.setdefault(run.n_pos, []).append(local)
    cells = grid.cells()
    columns = _Columns.plan(lm, measure, block, targets)
    truncate = prefix_reuse_ok(lm) and last_block_check(lm, targets[0])
    for layer_row, layer in enumerate(layers):
        for members in groups.values():
            rows, noop = _rows(lm, data, block, members, targets, sources, grid, layer, cells)
            for row in noop:
                per_pair[(block[row.pair],) + grid.index(layer_row, row.cell)] = unpatched[row.pair]
            if noop:
                yield len(noop)
            stacked = _stack(targets, members, grid.component, layer)

            def compute(chunk, layer=layer, stacked=stacked):
                final = _chunk_final(lm, stacked, sources, grid.component, layer, chunk, truncate, cancel)
                pairs = [r.pair for r in chunk]
                if columns is not None:
                    return columns.raw(lm, final, pairs)
                return measure.raw(lm.adapter.logits_from_resid(final).float(), block_t[pairs],
                                   clean_logprobs[pairs])
            for chunk, (vals, zero) in chunks_shrinking_on_oom(rows, budget, compute, cancel, "patched row"):
                pairs = [r.pair for r in chunk]
                vals = vals.cpu().numpy()
                for r, v in zip(chunk, vals):
                    per_pair[(block[r.pair],) + grid.index(layer_row, r.cell)] = v
                zero_pairs.update(int(block[pairs[i]]) for i in torch.nonzero(zero).flatten().tolist())
                yield len(chunk)


class _Columns:
    """A metric read from logits alone (no log-probabilities: logit_diff, or an expression of logit() only) needs
    the unembedding of its tokens only: the block's answer, wrong and quoted tokens. Used where those columns of
    the block's recorded runs equal their full logits (the unembedding is a plain linear layer)."""

    def __init__(self, ids: torch.Tensor, bound: BoundMetric, answer: TokenSets, wrong: TokenSets):
        self.ids, self.bound, self.answer, self.wrong = ids, bound, answer, wrong

    @classmethod
    def plan(cls, lm, measure: DatasetMetric, block, runs):
        if measure.bound is None or any(node[0] in ("logprob", "prob") for node in measure.bound.expr.nodes()):
            return None  # kl_div (no bound expression) and log-probabilities need every logit
        index = torch.as_tensor(block, dtype=torch.long)
        answer, wrong = measure.answer.rows(index), measure.wrong.rows(index)
        literal = list(measure.bound.literal_ids.values())
        ids = torch.unique(torch.cat([answer.ids[answer.mask], wrong.ids[wrong.mask], torch.tensor(literal,
                                                                                                 dtype=torch.long)]))
        where = {int(t): i for i, t in enumerate(ids.tolist())}

        def remap(ts: TokenSets) -> TokenSets:
            return TokenSets(torch.tensor([[where.get(int(t), 0) for t in row] for row in ts.ids.tolist()],
                                          dtype=torch.long).reshape(ts.ids.shape), ts.mask)
        bound = BoundMetric(measure.bound.expr, {k: where[v] for k, v in measure.bound.literal_ids.items()})
        out = cls(ids, bound, remap(answer), remap(wrong))
        return out if out._matches(lm, runs) else None

    def _matches(self, lm, runs) -> bool:
        """The columns of the recorded runs' final residual streams against their recorded logits."""
        from desktop_app.engine.conformance import _REL_TOL

        n = lm.info.n_layers
        final = torch.cat([r.resid_post(n - 1)[:, -1] for r in runs])
        got = unembed_columns(lm, final, self.ids)
        if got is None:
            return False
        ref = torch.stack([r.logits_last for r in runs])[:, self.ids]
        tol = _REL_TOL.get(final.dtype, 1e-2) * max(1.0, float(ref.abs().max()))
        return float((got.cpu() - ref).abs().max()) <= tol

    def raw(self, lm, final: torch.Tensor, pairs):
        logits = unembed_columns(lm, final, self.ids)
        index = torch.as_tensor(pairs, dtype=torch.long)
        return self.bound(logits, self.answer.rows(index), self.wrong.rows(index))


def _rows(lm, data, block, members, targets, sources, grid: _Grid, layer: int, cells):
    """(rows to compute sorted by their first position, rows that change nothing) of one layer and group."""
    restart = _restart_block(grid.component, layer)
    later = restart < lm.info.n_layers and prefix_reuse_ok(lm) and \
        all(can_start_later(targets[m], restart) for m in members)
    # a patch in the last block after its attention read the block's input (anything but resid_pre) reaches the
    # last position's output only through the last position: rows start there, other positions change nothing
    last_only = layer == lm.info.n_layers - 1 and grid.component != "resid_pre" and prefix_reuse_ok(lm) and \
        all(can_start_later(targets[m], layer) for m in members)
    if grid.component == "resid_post" and layer == lm.info.n_layers - 1:
        last_only = True  # straight to the unembedding: no keys and values needed
    heads = grid.heads > 0
    rows, noop = [], []
    for m in members:
        a, b = _act(targets[m], grid.component, layer)[0], _act(sources[m], grid.component, layer)[0]
        pair = data.pairs[block[m]]
        if grid.mode == "all":
            # per head (or for the whole activation): the first position where the two runs differ
            differ = (a != b).flatten(2).any(-1) if heads else (a != b).flatten(1).any(-1, keepdim=True)
            first = torch.where(differ.any(0), differ.float().argmax(0), -1).tolist()  # [heads] or [1]
            for cell in cells:
                start = first[cell[1]] if heads else first[0]
                if start < 0:
                    noop.append(_Row(m, cell, -1, -1, cell[1], 0))
                else:
                    n_last = targets[m].n_pos - 1
                    rows.append(_Row(m, cell, -1, -1, cell[1], n_last if last_only else start if later else 0))
            continue
        slots = [grid.positions(pair, slot) for slot in range(grid.slots)]
        ts, ss = [t for t, _ in slots], [s for _, s in slots]
        same = a[ts] == b[ss]  # [slots, d] or [slots, heads, d_head]
        same = (same.flatten(2).all(-1) if heads else same.flatten(1).all(-1, keepdim=True)).tolist()
        for cell in cells:
            slot, head = cell
            t, s = slots[slot]
            if same[slot][head if heads else 0] or (last_only and t != targets[m].n_pos - 1):
                noop.append(_Row(m, cell, t, s, head, 0))
            else:
                rows.append(_Row(m, cell, t, s, head, t if later else 0))
    rows.sort(key=lambda r: r.start)
    return rows, noop


def _restart_block(component: str, layer: int) -> int:
    return layer + 1 if component == "resid_post" else layer


@dataclasses.dataclass
class _Stacked:
    """One group's target runs stacked over pairs: the states a row starts from and the keys and values."""
    members: list[int]
    template: RecordedRun  # block arguments (the same for prompts of one length)
    hidden: torch.Tensor  # [members, pos, d] the input of the restart block (or the final residual)
    prefix_kv: list | None  # per layer (keys, values) [members, kv_heads, pos, d]
    z: torch.Tensor | None = None  # head_out: the patched layer's hook_z [members, pos, heads, d_head]


def _stack(targets, members, component, layer) -> _Stacked:
    runs = [targets[m] for m in members]
    if component == "resid_post":
        hidden = torch.cat([r.resid_post(layer) for r in runs])
    else:
        hidden = torch.cat([r.resid_pre[layer] for r in runs])
    kv = None
    if all(r.prefix_kv is not None for r in runs):
        kv = [(torch.cat([r.prefix_kv[L][0] for r in runs]), torch.cat([r.prefix_kv[L][1] for r in runs]))
              for L in range(len(runs[0].prefix_kv))]
    z = torch.cat([_act(r, component, layer) for r in runs]) if component == "head_out" else None
    return _Stacked(members, runs[0], hidden, kv, z)


def _chunk_final(lm, stacked: _Stacked, sources, component: str, layer: int, chunk, truncate: bool, cancel):
    """The final residual stream at the last position [rows, d_model] of a chunk of rows of one start."""
    start = chunk[0].start
    local = torch.tensor([stacked.members.index(r.pair) for r in chunk])
    hidden = stacked.hidden[:, start:].index_select(0, local)
    block = _restart_block(component, layer)
    n = lm.info.n_layers
    prefix = None
    if start > 0 and block < n:
        prefix = [(k[:, :, :start].index_select(0, local), v[:, :, :start].index_select(0, local))
                  for k, v in stacked.prefix_kv]
    patch = _patcher(chunk, sources, component, layer, start)
    if component == "head_out" and given_attention_check(lm, stacked.template, layer):
        # only the patched layer's attention output changes: the output projection of the patched hook_z
        z = patch(stacked.z[:, start:].index_select(0, local))
        attn_out = block_output_tensor(lm.adapter.o_proj(layer)(z.flatten(-2)))
        hidden = run_block_given_attention(lm, stacked.template, layer, hidden, attn_out, start)
        return run_rows(lm, stacked.template, layer + 1, hidden, start, prefix, cancel, last_block_last_only=truncate)
    if component in ("resid_pre", "resid_post"):
        hidden = patch(hidden)
        return run_rows(lm, stacked.template, block, hidden, start, prefix, cancel, last_block_last_only=truncate)
    name = hook_name(layer, "attn.hook_z" if component == "head_out" else component)
    with hooks(lm, write={name: patch}):
        return run_rows(lm, stacked.template, block, hidden, start, prefix, cancel,
                        last_block_last_only=truncate and layer < n - 1)


def _patcher(chunk, sources, component: str, layer: int, start: int):
    """The write that puts each row's source slice into its activation [rows, pos - start, ...]."""
    src = [_act(sources[r.pair], component, layer)[0] for r in chunk]
    rows = torch.arange(len(chunk))
    heads = torch.tensor([r.head for r in chunk])
    if chunk[0].t >= 0:  # one position per row (all rows of a sweep share the mode)
        t = torch.tensor([r.t - start for r in chunk])
        vals = torch.stack([x[r.s, r.head] if r.head >= 0 else x[r.s] for x, r in zip(src, chunk)])

        def write(act):
            act = act.clone()
            v = vals.to(act.device, act.dtype)
            if component == "head_out":
                act[rows.to(act.device), t.to(act.device), heads.to(act.device)] = v
            else:
                act[rows.to(act.device), t.to(act.device)] = v
            return act
        return write
    full = torch.stack([x[start:] for x in src])  # [rows, pos - start, ...]

    def write_all(act):
        act = act.clone()
        v = full.to(act.device, act.dtype)
        if component == "head_out":
            act[rows.to(act.device), :, heads.to(act.device)] = v[rows, :, heads]
        else:
            act[:] = v
        return act
    return write_all
