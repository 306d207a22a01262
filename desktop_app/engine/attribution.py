"""Attribution patching (Nanda 2023; Syed et al. 2023): the first-order estimate of every activation patch at once.

For a cell, patching changes the metric by about (source act - target act) . d metric / d act, the gradient taken
on the target run (denoise: target = corrupted, source = clean; noise: the reverse). One forward pass of the
source, one forward pass of the target keeping its graph and one backward give the whole heatmap. Values are in
metric units like `activation_patching_job`'s: metric(target) + the estimated change, so a denoise heatmap of
logit_diff_recovered starts from 0 and a perfect cell reads 1. "all" positions is the sum over positions.

The estimate is exact where the metric is an affine function of the patched activation (e.g. the last block's
outputs when the final norm is linear); elsewhere it is a linearisation and can be far from the exact patch.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks
from desktop_app.engine.conformance import checks_for_component, require
from desktop_app.engine.errors import JobCancelled, OutOfMemory
from desktop_app.engine.hooknames import EMBED, hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.memory import is_oom
from desktop_app.engine.metrics import MetricContext
from desktop_app.engine.patching import new_sweep_result
from desktop_app.engine.prompts import PromptPair

# A backward pass costs about two forward passes (a matmul's gradient needs two matmuls of its size), so the
# whole heatmap costs 1 (source) + 1 (target) + 2 (backward) forward-pass equivalents, whatever its size.
FORWARD_PASS_EQUIVALENTS = 4.0


def cost_in_forward_passes() -> float:
    """The cost of one attribution heatmap in forward-pass equivalents (for the benchmark)."""
    return FORWARD_PASS_EQUIVALENTS


def _hook_of(component: str, layer: int) -> str:
    return hook_name(layer, "attn.hook_z" if component == "head_out" else component)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    # parameters are frozen, so nothing in the graph would require grad: the embedding output becomes a leaf
    return x.detach().requires_grad_(True)


def _source_acts(lm, ids, names, cancel):
    with torch.no_grad(), hooks(lm, read=names, cancel=cancel) as store:
        logits = forward_logits(lm, as_ids(ids), last_only=True)[0, -1].float().cpu()
    return logits, {n: store[n] for n in names}


def _target_grads(lm, ids, names, make_metric, cancel):
    """(metric context, activations, gradients of the metric w.r.t. them) from one forward and one backward;
    make_metric(target logits [vocab] on the CPU) builds the metric once the target's own logits are known."""
    write = {EMBED: _leaf}
    # identity writes put every read activation on the path the outputs are computed from (hook_z and resid_mid
    # are derived views otherwise)
    write.update({n: (lambda a: a) for n in names})
    with torch.enable_grad(), hooks(lm, read=names, write=write, keep_graph=True, cancel=cancel) as store:
        logits = forward_logits(lm, as_ids(ids), last_only=True)[0, -1]
        ctx = make_metric(logits.detach().float().cpu())
        value = ctx(logits[None])[0]
        acts = [store[n] for n in names]
        grads = torch.autograd.grad(value, acts, allow_unused=True)
    acts = {n: a.detach() for n, a in zip(names, acts)}
    grads = {n: (torch.zeros_like(acts[n]) if g is None else g.detach()) for n, g in zip(names, grads)}
    return ctx, acts, grads


def attribution_patching_job(lm, pair: PromptPair, component: str = "resid_pre", positions: str = "each",
                             direction: str = "denoise", metric: str = "logit_diff_recovered",
                             name: str = "attribution", layers=None, cancel: CancelToken | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    plan, result = new_sweep_result(lm, pair, "attribution_patching", component, positions, direction, metric,
                                    name, layers)
    require(lm, *checks_for_component(component, restarts=False), analysis=f"attribution patching of {component}")
    values = result.values
    names = [_hook_of(component, L) for L in plan.layers]
    source_ids, target_ids = ((pair.clean.ids, pair.corrupted.ids) if direction == "denoise"
                              else (pair.corrupted.ids, pair.clean.ids))
    yield Progress(0, 3, "source run")
    # grad mode is needed even when the caller runs jobs under inference_mode
    with torch.inference_mode(False):
        try:
            source_logits, source = _source_acts(lm, source_ids, names, cancel)
            cancel.check()
            yield Progress(1, 3, "target run and backward pass")

            def make_metric(target_logits):
                clean, corrupted = ((source_logits, target_logits) if direction == "denoise"
                                    else (target_logits, source_logits))
                return MetricContext(metric, pair.answer_id, pair.wrong_id, clean, corrupted)
            ctx, target, grads = _target_grads(lm, target_ids, names, make_metric, cancel)
            result.clean_metric, result.corrupted_metric = ctx.clean_value, ctx.corrupted_value
            result.message = ctx.warning
            base = ctx.corrupted_value if direction == "denoise" else ctx.clean_value
            yield Progress(2, 3, "attributions")
            with torch.no_grad():
                for row, n in enumerate(names):
                    g = grads[n].float()
                    diff = source[n].to(g.device).float() - target[n].float()
                    cell = (diff * g).sum(-1)[0]  # [pos] or [pos, heads]
                    if not plan.per_position:
                        cell = cell.sum(0)
                    values[row] = base + cell.cpu().numpy()
            index = tuple(np.array(ix) for ix in np.indices(values.shape).reshape(values.ndim, -1))
            yield Partial(index=index, values=values[index].copy())
            yield Progress(3, 3, "done")
        except JobCancelled:
            result.status = "partial" if np.isfinite(values).any() else "cancelled"
            result.message = "cancelled before the attributions were computed"
        except Exception as err:  # noqa: BLE001 - out of memory becomes a failed result, anything else propagates
            if not is_oom(err):
                raise
            result.status = "failed"
            result.message = str(OutOfMemory("the model ran out of memory during the backward pass; free memory or "
                                             "use a smaller dtype."))
    result.elapsed_s = time.perf_counter() - t0
    return result
