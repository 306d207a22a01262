"""Ablation sweeps: knock out one cell (layer[, position][, head]) of the clean run and read the metric.

Every method turns into a replacement activation per hook point, and the sweep is activation patching from
that replacement (`patching.sweep_layers`: batched rows restarted from the recorded clean run):

- zero: zeros.
- mean over "prompts": the reference prompts' activations at the hook. When they all have the clean prompt's
  token length the mean is taken per position (the usual template-aligned mean); otherwise every token of
  every reference prompt counts once and the single mean vector stands at every position.
- mean over "positions": the clean run's own activation averaged over its positions.
- noise: the clean activation plus Gaussian noise of std `noise` x (std of that activation over all its
  elements), drawn per hook from a CPU generator seeded with `noise_seed(seed, layer)`, so a cell's noise
  does not depend on the batching or on which layers are swept.
- resample: the activation of `source_prompt` (default: the corrupted prompt), which must have the clean
  prompt's token length.

A full hook point name instead of a short component ablates that one hook: dims ["hook"] (positions "all",
one value) or ["position"] (positions "each").
"""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from desktop_app.engine.capture import forward_logits, hooks, run_with_cache
from desktop_app.engine.conformance import checks_for_component, require, require_for_hook
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.hooknames import hook_name, parse_hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.memory import rows_per_batch
from desktop_app.engine.metrics import METRICS, MetricContext
from desktop_app.engine.patching import (COMPONENTS, SweepPlan, _labels, _patch_rows, _source_reads, sweep_layers,
                                         validate)
from desktop_app.engine.prompts import PromptPair
from desktop_app.engine.replay import RecordedRun, record_run
from desktop_app.engine.results import AnalysisResult, empty_values

METHODS = ("zero", "mean", "noise", "resample")
MEAN_OVER = ("prompts", "positions")


def noise_seed(seed: int, layer: int | None) -> int:
    """The generator seed of one hook's noise draw (layer None: hook_embed / ln_final)."""
    return int(seed) * 1_000_003 + (-1 if layer is None else layer) + 1


def _hook_of(component: str, layer: int) -> str:
    return hook_name(layer, "attn.hook_z" if component == "head_out" else component)


def _clean_act(run: RecordedRun, name: str) -> torch.Tensor:
    layer, kind = parse_hook_name(name)
    if kind == "resid_pre":
        return run.resid_pre[layer]
    if kind == "resid_post":
        return run.resid_post(layer)
    return run.acts[name]


def _tokens(lm, pair: PromptPair, text: str, what: str):
    return lm.tokenize(text, prepend_bos=pair.clean.bos, what=what)


def _replacements(lm, pair, clean: RecordedRun, names, method, mean_over, reference_prompts, noise, seed,
                  source_prompt, cancel) -> dict[str, torch.Tensor]:
    """{hook name: replacement activation [1, pos, ...]} for every hook the job ablates."""
    acts = {n: _clean_act(clean, n) for n in names}
    if method == "zero":
        return {n: torch.zeros_like(a) for n, a in acts.items()}
    if method == "noise":
        out = {}
        for n, a in acts.items():
            gen = torch.Generator().manual_seed(noise_seed(seed, parse_hook_name(n)[0]))
            eps = torch.randn(tuple(a.shape), generator=gen, dtype=torch.float32)
            std = a.float().std().cpu()
            out[n] = (a.float().cpu() + noise * std * eps).to(a.device, a.dtype)
        return out
    if method == "mean" and mean_over == "positions":
        return {n: a.mean(dim=1, keepdim=True).expand_as(a).contiguous() for n, a in acts.items()}
    if method == "mean":
        if not reference_prompts:
            raise SpecError("mean ablation over prompts needs reference_prompts; add some prompts or set "
                            "mean_over to 'positions'.")
        per_prompt = []
        for i, text in enumerate(reference_prompts):
            cancel.check()
            ids = _tokens(lm, pair, text, f"reference prompt {i + 1}").ids
            per_prompt.append(run_with_cache(lm, ids, names, cancel)[1])
        aligned = all(p[names[0]].shape[1] == pair.n_pos for p in per_prompt)
        out = {}
        for n, a in acts.items():
            if aligned:
                mean = torch.cat([p[n].float() for p in per_prompt]).mean(0, keepdim=True)
            else:
                mean = torch.cat([p[n][0].float() for p in per_prompt]).mean(0)[None, None].expand_as(a)
            out[n] = mean.to(a.device, a.dtype).contiguous()
        return out
    # resample
    if source_prompt is None:
        if list(pair.corrupted.ids) == list(pair.clean.ids):
            raise SpecError("resample ablation needs a source prompt; set source_prompt or a corrupted prompt.")
        src = pair.corrupted
    else:
        src = _tokens(lm, pair, source_prompt, "source prompt")
    if len(src.ids) != pair.n_pos:
        raise PromptError(
            f"the source prompt is {len(src.ids)} tokens and the clean prompt {pair.n_pos}; resampling needs the "
            f"same length. clean: {' | '.join(pair.clean.display)}  source: {' | '.join(src.display)}")
    cached = run_with_cache(lm, src.ids, names, cancel)[1]
    return {n: cached[n].to(a.device, a.dtype) for n, a in acts.items()}


def _replacement_run(clean: RecordedRun, component: str, layers, repl: dict) -> RecordedRun:
    """A run-shaped holder of the replacement activations, laid out where `patching` reads its source."""
    resid_pre = list(clean.resid_pre)
    acts = {}
    for L in layers:
        name = _hook_of(component, L)
        if component == "resid_pre":
            resid_pre[L] = repl[name]
        elif component == "resid_post" and L + 1 < len(resid_pre):
            resid_pre[L + 1] = repl[name]
        else:
            acts[name] = repl[name]
    return dataclasses.replace(clean, resid_pre=resid_pre, acts=acts)


def _check_full_name(lm, component: str) -> str:
    try:
        layer, kind = parse_hook_name(component)
    except ValueError:
        raise SpecError(f"{component!r} is neither a component ({', '.join(COMPONENTS)}) nor a hook point name "
                        "like blocks.0.attn.hook_z.") from None
    if kind == "attn.hook_pattern":
        raise SpecError(f"{component} cannot be ablated; ablate blocks.{layer}.attn.hook_z (head outputs) instead.")
    lm.hook_point(component)  # raises for a layer out of range or a hook this model lacks
    return component


def ablation_job(lm, pair: PromptPair, component: str = "head_out", method: str = "zero", positions: str = "all",
                 metric: str = "logit_diff", layers=None, reference_prompts=(), mean_over: str = "prompts",
                 noise: float = 1.0, seed: int = 0, source_prompt: str | None = None, name: str = "ablation",
                 cancel: CancelToken | None = None, batch_size: int | None = None):
    cancel = cancel or CancelToken()
    full = component not in COMPONENTS
    if method not in METHODS:
        raise SpecError(f"unknown ablation method {method!r}; choose one of {', '.join(METHODS)}.")
    if mean_over not in MEAN_OVER:
        raise SpecError(f"mean_over must be 'prompts' or 'positions', not {mean_over!r}.")
    if positions not in ("each", "all"):
        raise SpecError(f"positions must be 'each' or 'all', not {positions!r}.")
    if full:
        if metric not in METRICS and not callable(metric):
            raise SpecError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}.")
        names = [_check_full_name(lm, component)]
        require_for_hook(lm, component, f"ablation of {component}", restarts=False)  # plain forward passes
    else:
        layers = validate(component, "denoise", metric, lm, layers)
        names = [_hook_of(component, L) for L in layers]
        require(lm, *checks_for_component(component), analysis=f"ablation of {component}")
    reference_prompts = [str(p) for p in reference_prompts]
    t0 = time.perf_counter()
    if full:
        dims = ["position"] if positions == "each" else ["hook"]
        labels = {"position": pair.clean.labels()} if positions == "each" else {"hook": [component]}
        values = empty_values((pair.n_pos,) if positions == "each" else (1,))
        plan = None
    else:
        plan = SweepPlan(component, positions == "each", layers, pair.n_pos, lm.info.n_heads)
        dims, labels, values = plan.dims, _labels(lm, plan, pair), empty_values(plan.shape)
    result = AnalysisResult(
        name=name, kind="ablation",
        params=dict(component=component, method=method, positions=positions, metric=metric, mean_over=mean_over,
                    reference_prompts=reference_prompts, noise=float(noise), seed=int(seed),
                    source_prompt=source_prompt),
        dims=dims, values=values, labels=labels,
        tokens_clean=np.array(pair.clean.ids), tokens_corrupted=np.array(pair.corrupted.ids))
    yield Progress(0, values.size, "recording the clean run")

    def cells():
        with torch.inference_mode():
            reads = names if full else _source_reads(component, lm.info.n_layers)
            clean = record_run(lm, pair.clean.ids, reads, cancel)
            corrupted_logits = clean.logits_last
            if list(pair.corrupted.ids) != list(pair.clean.ids):
                corrupted_logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1].float().cpu()
            ctx = MetricContext(metric, pair.answer_id, pair.wrong_id, clean.logits_last, corrupted_logits)
            result.clean_metric, result.corrupted_metric = ctx.clean_value, ctx.corrupted_value
            result.message = ctx.warning
            repl = _replacements(lm, pair, clean, names, method, mean_over, reference_prompts, float(noise), seed,
                                 source_prompt, cancel)
            if full:
                events = _ablate_one_hook(lm, clean, names[0], repl[names[0]], positions, ctx, values, cancel,
                                          batch_size)
            else:
                source = _replacement_run(clean, component, layers, repl)
                events = sweep_layers(lm, plan, clean, source, ctx, values, cancel, batch_size)
            yield from events
    return (yield from stream_cells(result, cells(), t0))


def _ablate_one_hook(lm, clean: RecordedRun, name: str, repl: torch.Tensor, positions: str, ctx, values, cancel,
                     batch_size):
    """Rows of full forward passes with one hook replaced (at one position per row, or everywhere)."""
    n_pos = clean.n_pos
    cells = [(p, -1) for p in range(n_pos)] if positions == "each" else [(-1, -1)]
    rows = batch_size or rows_per_batch(lm, n_pos)
    done = 0
    for start in range(0, len(cells), rows):
        cancel.check()
        chunk = cells[start:start + rows]
        write = {name: lambda act, chunk=chunk: _patch_rows(act, repl, chunk, heads=False)}
        with hooks(lm, write=write, cancel=cancel):
            logits = forward_logits(lm, clean.ids.expand(len(chunk), -1))[:, -1]
        vals = ctx(logits).cpu().numpy()
        index = (np.arange(start, start + len(chunk)),)
        values[index] = vals
        done += len(chunk)
        yield Partial(index=index, values=vals)
        yield Progress(done, values.size, name)
