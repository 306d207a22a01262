"""The dataset part of `interp-workbench bench`: a 32-pair IOI dataset, activation patching over every pair.

Three ways to get the same per-pair numbers, timed in one process on the same model and dataset:
  dataset   this workbench's dataset sweep (`dataset_patching`: pairs batched with the cells, each row restarted
            at the patched layer and position from its pair's recorded run), timed in full;
  singles   one single-pair sweep of this workbench per pair (`activation_patching_job`), timed on a sample of
            pairs and reported as a rate;
  TL-style  TransformerLens-style batched patching, written here: per cell, one forward pass of the whole
            32-pair corrupted batch with a hook that writes the clean cache's slice into that cell, logits at
            every position (as `run_with_hooks` returns them), the metric read at the last position; timed on a
            sample of cells and reported as a rate.
Rates are pair-cells per second (one cell of one pair). The TL-style values of the sampled cells are checked
against the dataset sweep's, so a speed-up is never reported for numbers that differ.
"""
from __future__ import annotations

import time

N_PAIRS = 32


def ioi_dataset(n: int = N_PAIRS, seed: int = 0):
    """A templated IOI dataset in which every prompt has one token length (one template, single-token names),
    tokenised with the demo model's tokenizer (vocabulary 512; its ids suit any model with a larger vocabulary)."""
    from desktop_app.demo_assets import demo_model_dir
    from desktop_app.engine.datasets import tokenize_dataset
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.templates import IOI_TEMPLATES, ioi_pairs

    tok_lm = load_model(demo_model_dir(), dtype="float32", device="cpu")
    pairs = ioi_pairs(n, seed, templates=IOI_TEMPLATES[:1], places=("store",), objects=("a drink",))
    return tokenize_dataset(tok_lm, pairs)


def _tl_style_rate(lm, data, component: str, cells, budget_s: float, check) -> tuple[float, float]:
    """(pair-cells per second, the largest difference from the dataset sweep's values) of TL-style patching."""
    import torch

    from desktop_app.engine.capture import hooks
    from desktop_app.engine.hooknames import hook_name

    kind = "attn.hook_z" if component == "head_out" else component
    names = [hook_name(L, kind) for L in range(lm.info.n_layers)]
    clean = torch.tensor([p.clean.ids for p in data.pairs], device=lm.input_device)
    corrupted = torch.tensor([p.corrupted.ids for p in data.pairs], device=lm.input_device)
    answer = torch.tensor([p.answer_ids[0] for p in data.pairs], device=lm.input_device)
    wrong = torch.tensor([p.wrong_ids[0] for p in data.pairs], device=lm.input_device)
    rows = torch.arange(len(data.pairs), device=lm.input_device)
    worst = 0.0
    with torch.inference_mode():
        t0 = time.perf_counter()
        with hooks(lm, read=names) as cache:
            lm.model(input_ids=clean, use_cache=False)
        done = 0
        while done < len(cells) and (done < 2 or time.perf_counter() - t0 < budget_s):
            layer, pos, head = cells[done]
            src = cache[names[layer]]

            def patch(act, src=src, pos=pos, head=head):
                act = act.clone()
                sl = (slice(None), slice(None) if pos < 0 else pos) + ((head,) if head >= 0 else ())
                act[sl] = src[sl]
                return act
            with hooks(lm, write={names[layer]: patch}):
                logits = lm.model(input_ids=corrupted, use_cache=False).logits  # [batch, pos, vocab]
            last = logits[:, -1].float()
            ld = (last[rows, answer] - last[rows, wrong]).cpu().numpy()
            worst = max(worst, check(layer, pos, head, ld))
            done += 1
        elapsed = time.perf_counter() - t0
    return done * len(data.pairs) / elapsed, worst


def _singles_rate(lm, data, component: str, positions: str, budget_s: float) -> float:
    from desktop_app.engine.dataset_runner import single_pair
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.patching import activation_patching_job

    def one(p):
        return drive(activation_patching_job(lm, single_pair(p), component, positions, "denoise", "logit_diff"))
    one(data.pairs[0])  # warm-up
    t0, n, cells = time.perf_counter(), 0, 0
    while n < len(data.pairs) and (n < 2 or time.perf_counter() - t0 < budget_s):
        cells += one(data.pairs[n]).values.size
        n += 1
    return cells / (time.perf_counter() - t0)


def _dataset_sweep(lm, data, component: str, positions: str):
    from desktop_app.engine.dataset_patching import dataset_patching_job
    from desktop_app.engine.jobs import drive

    def sweep():
        return drive(dataset_patching_job(lm, data, component, positions, "denoise", "logit_diff",
                                          pairs_per_block=len(data.pairs)))
    sweep()  # warm-up
    t0 = time.perf_counter()
    result = sweep()
    elapsed = time.perf_counter() - t0
    return result, result.extras["values_per_pair"].size / elapsed, elapsed


def flop_bound(info, data, component: str) -> tuple[float, float, float]:
    """(TL-style, exact minimum, this implementation's plan) multiply-adds per pair-cell, counted for a GPT-2-like
    block: per token a layer costs its projections (q, k, v, o), its MLP and the attention over the positions
    before it; the unembedding d_model x vocab. TL-style runs every layer at every position and unembeds every
    position. The exact minimum, per cell: nothing where the patch changes no activation; else the layers from
    the patch on at the positions from the first changed one, the last layer only as keys and values except at
    the last position, the metric's two logits; head_out recomputes only the patched layer's MLP (its attention
    output is the corrupted run's plus the head's output projection). The plan is what the sweep computes: the
    output projection of every head at the patched layer for head_out, query, key and value projections for the
    last layer's earlier positions."""
    d, n_layers, d_mlp, vocab = info.d_model, info.n_layers, info.d_mlp, info.vocab_size
    kv = info.n_kv_heads * info.d_head
    n_pos = len(data.pairs[0].clean.ids)

    def layer(p):  # one layer at position p
        return 2 * d * d + 2 * d * kv + 2 * d * d_mlp + 2 * (p + 1) * info.d_head * info.n_heads

    def rest(first_layer, start, kv_cost, patched=None):
        """layers first_layer.. at positions start.. (the last one: keys and values before the last position)."""
        total = 0
        for L in range(first_layer, n_layers):
            for p in range(start, n_pos):
                if L == n_layers - 1 and p < n_pos - 1:
                    total += kv_cost
                elif L == first_layer and patched is not None:
                    total += patched
                else:
                    total += layer(p)
        return total + 2 * d

    tl = n_layers * sum(layer(p) for p in range(n_pos)) + n_pos * d * vocab
    best = plan = 0.0
    for pair in data.pairs:
        differ = [i for i, (a, b) in enumerate(zip(pair.clean.ids, pair.corrupted.ids)) if a != b]
        first = differ[0]
        for L in range(n_layers):
            if component == "head_out":
                start = n_pos - 1 if L == n_layers - 1 else first
                best += info.n_heads * rest(L, start, 2 * d * kv, patched=2 * d * d_mlp + info.d_head * d)
                plan += info.n_heads * rest(L, start, d * d + 2 * d * kv, patched=2 * d * d_mlp + d * d)
                continue
            for t in range(n_pos):
                if (t in differ) if L == 0 else t >= first:
                    best += rest(L, t, 2 * d * kv)
                    plan += rest(L, t, d * d + 2 * d * kv)
    cells = len(data.pairs) * n_layers * (info.n_heads if component == "head_out" else n_pos)
    return tl, best / cells, plan / cells


def run(models, budget_s: float = 6.0, out=print) -> list[dict]:
    """Print one line per (model, sweep); returns the numbers as dicts."""
    import numpy as np

    data = ioi_dataset()
    n_pos = len(data.pairs[0].clean.ids)
    out(f"datasets: {len(data)} IOI pairs (ABC corruption), {n_pos} tokens each; pair-cells per second")
    out(f"{'model':40s} {'sweep':22s} {'dataset':>9s} {'singles':>9s} {'TL-style':>9s} {'vs singles':>10s} "
        f"{'vs TL':>7s} {'max |diff|':>10s}")
    rows = []
    for label, lm in models:
        for component, positions, title in (("resid_pre", "each", "resid_pre [layer, pos]"),
                                            ("head_out", "all", "head_out [layer, head]")):
            result, rate, elapsed = _dataset_sweep(lm, data, component, positions)
            per_pair = result.extras["values_per_pair"]
            if component == "head_out":
                cells = [(L, -1, h) for L in range(lm.info.n_layers) for h in range(lm.info.n_heads)]
            else:
                cells = [(L, p, -1) for L in range(lm.info.n_layers) for p in range(n_pos)]
            cells = [cells[i] for i in np.random.default_rng(0).permutation(len(cells))]

            def check(layer, pos, head, ld):
                ours = per_pair[:, layer, head] if component == "head_out" else per_pair[:, layer, pos]
                return float(np.abs(ours - ld).max())
            tl, worst = _tl_style_rate(lm, data, component, cells, budget_s, check)
            singles = _singles_rate(lm, data, component, positions, budget_s)
            row = dict(model=label, sweep=title, dataset=rate, singles=singles, tl_style=tl, seconds=elapsed,
                       vs_singles=rate / singles, vs_tl=rate / tl, max_diff=worst)
            rows.append(row)
            flag = "" if worst < 1e-3 else "  (values differ: speed-up not valid)"
            out(f"{label:40s} {title:22s} {rate:9.0f} {singles:9.0f} {tl:9.0f} {rate / singles:9.1f}x "
                f"{rate / tl:6.1f}x {worst:10.1e}{flag}")
            flops_tl, flops_best, flops_plan = flop_bound(lm.info, data, component)
            row.update(theoretical_best=flops_tl / flops_best, plan_bound=flops_tl / flops_plan)
            out(f"{'':40s} {'':22s} multiply-adds per pair-cell: TL-style {flops_tl / 1e6:.1f} M, ours "
                f"{flops_plan / 1e6:.1f} M (bound {flops_tl / flops_plan:.1f}x), exact minimum {flops_best / 1e6:.1f} M: "
                f"theoretical best ratio {flops_tl / flops_best:.1f}x")
    return rows
