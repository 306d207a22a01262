"""Activation patching sweeps: TransformerLens `get_act_patch_*` semantics, batched and restarted mid-model.

Denoise runs the corrupted prompt with one cell taken from the clean run; noise the other way round. Each
layer's cells go through the model together, as rows of one batch that starts at the patched layer from the
recorded run (the layers before it are never recomputed), and only the last position is unembedded.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from desktop_app.engine.conformance import checks_for_component, prefix_reuse_ok, require
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.memory import RowBudget, chunks_shrinking_on_oom, rows_per_batch
from desktop_app.engine.metrics import METRICS, MetricContext
from desktop_app.engine.prompts import PromptPair
from desktop_app.engine.replay import RecordedRun, can_start_later, record_run, run_from_layer
from desktop_app.engine.results import AnalysisResult, empty_values

COMPONENTS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "head_out")
DIRECTIONS = ("denoise", "noise")


@dataclass
class SweepPlan:
    """Which cells a sweep computes: every (layer, position[, head]) of the result grid."""
    component: str
    per_position: bool
    layers: list[int]
    n_pos: int
    n_heads: int

    @property
    def dims(self) -> list[str]:
        if self.component == "head_out":
            return ["layer", "position", "head"] if self.per_position else ["layer", "head"]
        return ["layer", "position"] if self.per_position else ["layer"]

    @property
    def shape(self) -> tuple[int, ...]:
        sizes = {"layer": len(self.layers), "position": self.n_pos, "head": self.n_heads}
        return tuple(sizes[d] for d in self.dims)

    def cells_of_layer(self) -> list[tuple[int, int, int]]:
        """(pos, head) per cell of one layer; pos -1 = all positions, head -1 = no head."""
        positions = range(self.n_pos) if self.per_position else [-1]
        heads = range(self.n_heads) if self.component == "head_out" else [-1]
        return [(p, h) for p in positions for h in heads]

    def index_of(self, layer_row: int, pos: int, head: int) -> tuple:
        idx = [layer_row]
        if self.per_position:
            idx.append(pos)
        if self.component == "head_out":
            idx.append(head)
        return tuple(idx)


def validate(component: str, direction: str, metric: str, lm, layers=None) -> list[int]:
    if component not in COMPONENTS:
        raise SpecError(f"unknown component {component!r}; choose one of {', '.join(COMPONENTS)}.")
    if direction not in DIRECTIONS:
        raise SpecError(f"unknown direction {direction!r}; choose denoise or noise.")
    if metric not in METRICS and not callable(metric):  # a bound metric expression is callable
        raise SpecError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
    if component == "resid_mid" and lm.info.parallel_attn_mlp:
        raise SpecError("resid_mid does not exist in this model (attention and MLP run in parallel); "
                        "choose resid_pre or resid_post.")
    n = lm.info.n_layers
    layers = list(range(n)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layers if not 0 <= x < n]
    if bad:
        raise SpecError(f"layer {bad[0]} is out of range: this model has layers 0-{n - 1}.")
    return layers


def _source_reads(component: str, n_layers: int) -> list[str]:
    if component in ("resid_pre", "resid_post"):
        return []
    kind = "attn.hook_z" if component == "head_out" else component
    return [hook_name(L, kind) for L in range(n_layers)]


def patching_runs(lm, pair: PromptPair, component: str, direction: str, cancel=None):
    """(target run, source run, metric refs) for a sweep: the run that is patched and the one patched from."""
    reads = _source_reads(component, lm.info.n_layers)
    clean = record_run(lm, pair.clean.ids, reads, cancel)
    corrupted = record_run(lm, pair.corrupted.ids, reads, cancel)
    return (corrupted, clean) if direction == "denoise" else (clean, corrupted)


def _rows_hidden(run: RecordedRun, layer: int, component: str, n_rows: int) -> tuple[torch.Tensor, int]:
    """The batch a chunk starts from and the block it enters."""
    if component == "resid_post":
        start = run.resid_post(layer)
        return start.expand(n_rows, -1, -1).clone(), layer + 1
    return run.resid_pre[layer].expand(n_rows, -1, -1).clone(), layer


def _patch_rows(act: torch.Tensor, source: torch.Tensor, cells, heads: bool) -> torch.Tensor:
    """Rows of `act` [rows, pos, ...] take `source` [1, pos, ...] at each row's cell (pos -1 = all)."""
    act = act.clone()
    src = source.to(act.device, act.dtype)[0]
    rows = torch.arange(len(cells), device=act.device)
    pos = torch.tensor([p for p, _ in cells], device=act.device)
    head = torch.tensor([h for _, h in cells], device=act.device)
    if bool((pos >= 0).all()):
        if heads:
            act[rows, pos, head] = src[pos, head]
        else:
            act[rows, pos] = src[pos]
    elif heads:
        act[rows, :, head] = src[:, head].transpose(0, 1)
    else:
        act[rows] = src
    return act


def _first_changed_position(lm, target: RecordedRun, block: int, cells) -> int:
    """Where the rows' computation can start: a patch at position p leaves positions before p as they were in
    the target run, so a chunk whose cells all sit at p or later reuses those (0 when it cannot)."""
    if any(pos < 0 for pos, _ in cells) or block >= lm.info.n_layers or not can_start_later(target, block):
        return 0
    if not prefix_reuse_ok(lm):  # the load-time check found prefix reuse wrong here: recompute every position
        return 0
    return min(pos for pos, _ in cells)


def _chunk_logits(lm, target: RecordedRun, source: RecordedRun, component: str, layer: int, cells, cancel):
    from desktop_app.engine.capture import hooks

    hidden, block = _rows_hidden(target, layer, component, len(cells))
    start = _first_changed_position(lm, target, block, cells)
    hidden = hidden[:, start:]
    cells = [(pos - start if pos >= 0 else pos, head) for pos, head in cells]
    if component in ("resid_pre", "resid_post"):
        src = source.resid_pre[layer] if component == "resid_pre" else source.resid_post(layer)
        hidden = _patch_rows(hidden, src[:, start:], cells, heads=False)
        if block == lm.info.n_layers:  # resid_post of the last layer: straight to the unembedding
            return lm.adapter.logits_from_resid(hidden[:, -1]).float()
        return run_from_layer(lm, target, block, hidden, cancel, start=start)
    name = hook_name(layer, "attn.hook_z" if component == "head_out" else component)
    src = source.acts[name][:, start:]
    write = {name: lambda act: _patch_rows(act, src, cells, heads=component == "head_out")}
    with hooks(lm, write=write):
        return run_from_layer(lm, target, block, hidden, cancel, start=start)


def new_sweep_result(lm, pair: PromptPair, kind: str, component: str, positions: str, direction: str,
                     metric: str, name: str, layers=None) -> tuple[SweepPlan, AnalysisResult]:
    """The checked plan and the empty (all-NaN) result of a patching-shaped sweep: activation or attribution
    patching, and the window's skeleton that streamed cells are drawn into."""
    layers = validate(component, direction, metric, lm, layers)
    if positions not in ("each", "all"):
        raise SpecError(f"positions must be 'each' or 'all', not {positions!r}.")
    plan = SweepPlan(component, positions == "each", layers, pair.n_pos, lm.info.n_heads)
    result = AnalysisResult(
        name=name, kind=kind,
        params=dict(component=component, positions=positions, direction=direction, metric=metric),
        dims=plan.dims, values=empty_values(plan.shape), labels=_labels(lm, plan, pair),
        tokens_clean=np.array(pair.clean.ids), tokens_corrupted=np.array(pair.corrupted.ids))
    return plan, result


def activation_patching_job(lm, pair: PromptPair, component: str = "resid_pre", positions: str = "each",
                            direction: str = "denoise", metric: str = "logit_diff_recovered",
                            name: str = "patching", layers=None, cancel: CancelToken | None = None,
                            batch_size: int | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    plan, result = new_sweep_result(lm, pair, "activation_patching", component, positions, direction, metric,
                                    name, layers)
    require(lm, *checks_for_component(component), analysis=f"activation patching of {component}")
    values = result.values
    yield Progress(0, values.size, "recording the clean and corrupted runs")

    def cells():
        with torch.inference_mode():
            target, source = patching_runs(lm, pair, component, direction, cancel)
            ctx = MetricContext(metric, pair.answer_id, pair.wrong_id,
                                *_clean_corrupted_logits(target, source, direction))
            result.clean_metric, result.corrupted_metric = ctx.clean_value, ctx.corrupted_value
            result.message = ctx.warning
            yield from sweep_layers(lm, plan, target, source, ctx, values, cancel, batch_size)
    return (yield from stream_cells(result, cells(), t0))


def sweep_layers(lm, plan: SweepPlan, target: RecordedRun, source: RecordedRun, ctx: MetricContext,
                 values: np.ndarray, cancel: CancelToken, batch_size: int | None = None):
    """Fill `values` cell by cell: per layer, the cells go as batched rows restarted from `target` with each row's
    cell taken from `source` (any run-shaped object holding replacement activations). Yields Partial and
    Progress (done counts the cells finished); out-of-memory halves the rows and retries."""
    budget = RowBudget(batch_size or rows_per_batch(lm, plan.n_pos))
    total, done = values.size, 0
    unpatched = float(ctx(target.logits_last[None])[0])
    for row_of_layer, layer in enumerate(plan.layers):
        noop, cells = _split_noop_cells(plan, target, source, layer)
        if noop:  # replacing an activation by an identical one changes nothing: no forward pass needed
            index = _cell_index(plan, row_of_layer, noop)
            vals = np.full(len(noop), unpatched, dtype=values.dtype)
            values[index] = vals
            done += len(noop)
            yield Partial(index=index, values=vals)
        def compute(chunk, layer=layer):
            return _chunk_logits(lm, target, source, plan.component, layer, chunk, cancel)
        for chunk, logits in chunks_shrinking_on_oom(cells, budget, compute, cancel):
            vals = ctx(logits).cpu().numpy()
            index = _cell_index(plan, row_of_layer, chunk)
            values[index] = vals
            done += len(chunk)
            yield Partial(index=index, values=vals)
            yield Progress(done, total, f"layer {layer}")


def _cell_index(plan: SweepPlan, row_of_layer: int, cells) -> tuple:
    return tuple(np.array(ix) for ix in zip(*[plan.index_of(row_of_layer, p, h) for p, h in cells]))


def _layer_activation(run, component: str, layer: int):
    if component == "resid_pre":
        return run.resid_pre[layer]
    if component == "resid_post":
        return run.resid_post(layer) if hasattr(run, "resid_post") else None
    return getattr(run, "acts", {}).get(hook_name(layer, "attn.hook_z" if component == "head_out" else component))


def _split_noop_cells(plan: SweepPlan, target, source, layer: int):
    """(cells whose source slice equals the target's exactly, the other cells). Prompts that share a prefix
    have identical activations there in a causal model, so those cells need no forward pass."""
    cells = plan.cells_of_layer()
    try:
        a = _layer_activation(target, plan.component, layer)
        b = _layer_activation(source, plan.component, layer)
    except (AttributeError, IndexError, KeyError):
        return [], cells
    if a is None or b is None or a.shape != b.shape:
        return [], cells
    same = (a[0] == b[0])  # [pos, d] or [pos, head, d_head]
    same = same.flatten(2).all(-1) if plan.component == "head_out" else same.all(-1)
    noop, rest = [], []
    for pos, head in cells:
        s = same[:, head] if head >= 0 else same
        s = s.all() if pos < 0 else s[pos]
        (noop if bool(s) else rest).append((pos, head))
    return noop, rest


def _clean_corrupted_logits(target: RecordedRun, source: RecordedRun, direction: str):
    if direction == "denoise":
        return source.logits_last, target.logits_last
    return target.logits_last, source.logits_last


def _labels(lm, plan: SweepPlan, pair: PromptPair) -> dict:
    labels = {"layer": [str(L) for L in plan.layers]}
    if plan.per_position:
        labels["position"] = pair.clean.labels()
    if plan.component == "head_out":
        labels["head"] = [str(h) for h in range(plan.n_heads)]
    return labels
