"""Causal tracing (ROME, Meng et al. 2022): corrupt the subject's embeddings with noise, then restore one clean
state at a time and see how much of the answer's probability comes back.

`samples` noisy copies of the clean prompt get Gaussian noise of std `noise` x (the std of the clean hook_embed
output over the subject tokens) added at hook_embed, at the subject's positions only (one seeded CPU generator,
one draw [samples, subject tokens, d_model], the same noise for every cell). A cell (layer L, position t):
- resid_post: the clean residual stream after block L at position t replaces the noisy one in every copy;
- mlp_out / attn_out: the clean outputs of that sub-module at position t, at every layer of ROME's window
  [max(0, L - window // 2), min(n_layers, L + ceil(window / 2))) (`trace_important_window`: `layer - (-window // 2)`).
The value is the answer's probability at the last position, averaged over the copies.

Speed: the noisy copies are recorded once (resid_pre of every layer, batch = samples); each cell restarts at its
first restored layer from those states, with rows = samples x cells in one batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks
from desktop_app.engine.conformance import checks_for_component, require
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.hooknames import EMBED, hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.memory import RowBudget, chunks_shrinking_on_oom, rows_per_batch
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.prompts import PromptPair
from desktop_app.engine.replay import RecordedRun, record_run, run_from_layer
from desktop_app.engine.results import AnalysisResult, empty_values

TRACING_COMPONENTS = ("resid_post", "mlp_out", "attn_out")


def subject_positions(tokens: TokenInfo, subject: str) -> list[int]:
    """Token positions covering the first occurrence of `subject` in the prompt's text (as ROME does)."""
    text = "".join(tokens.strings)
    start = text.find(subject) if subject else -1
    if start < 0 and subject.strip():
        subject = subject.strip()
        start = text.find(subject)
    if start < 0:
        raise PromptError(f"the subject {subject!r} does not occur in the clean prompt; type text that does. "
                          f"tokens: {' | '.join(tokens.display)}")
    end = start + len(subject)
    positions, offset = [], 0
    for i, s in enumerate(tokens.strings):
        if s and offset < end and offset + len(s) > start:
            positions.append(i)
        offset += len(s)
    return positions


def window_layers(layer: int, window: int, n_layers: int) -> range:
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def noise_draw(samples: int, n_subject: int, d_model: int, seed: int) -> torch.Tensor:
    """The unit Gaussian draw [samples, subject tokens, d_model] a trace scales by noise x embedding std."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn((samples, n_subject, d_model), generator=gen, dtype=torch.float32)


@dataclass
class TraceState:
    clean: RecordedRun  # acts: hook_embed and the component's hooks
    noisy_resid: list[torch.Tensor]  # per layer, resid_pre of the noisy copies [samples, pos, d]; [n_layers] = final
    noisy_probs: torch.Tensor  # [samples] answer probability of the fully corrupted copies
    answer_id: int
    positions: list[int]
    embed_std: float

    @property
    def samples(self) -> int:
        return self.noisy_resid[0].shape[0]


def prepare_trace(lm, ids, answer_id: int, positions: list[int], component: str, noise: float, samples: int,
                  seed: int, cancel: CancelToken | None = None) -> TraceState:
    """The clean run and the noisy copies, recorded once."""
    n = lm.info.n_layers
    reads = [EMBED] + ([hook_name(L, component) for L in range(n)] if component != "resid_post" else [])
    clean = record_run(lm, ids, reads, cancel)
    emb = clean.acts[EMBED]
    std = float(emb[0, positions].float().std()) if len(positions) * emb.shape[-1] > 1 else 0.0
    delta = noise_draw(samples, len(positions), emb.shape[-1], seed) * (noise * std)

    def add_noise(x):
        x = x.clone()
        x[:, positions] += delta.to(x.device, x.dtype)
        return x

    names = [hook_name(L, "resid_pre") for L in range(n)] + [hook_name(n - 1, "resid_post")]
    with hooks(lm, read=names, write={EMBED: add_noise}, cancel=cancel) as store:
        logits = forward_logits(lm, as_ids(ids).expand(samples, -1))[:, -1].float()
    noisy = [store[name] for name in names]
    probs = torch.softmax(logits, -1)[:, answer_id].cpu()
    return TraceState(clean, noisy, probs, answer_id, positions, std)


def restored_probs(lm, state: TraceState, component: str, window: int, cells, cancel=None) -> torch.Tensor:
    """Mean answer probability over the noisy copies for each cell (layer, positions) restored to clean; the
    cells must share their first restored layer (`start_layer`). Returns [len(cells)] float32 on the CPU."""
    n, S = lm.info.n_layers, state.samples
    start = start_layer(cells[0][0], component, window)
    rows_of = torch.arange(len(cells) * S).view(len(cells), S)
    hidden = state.noisy_resid[start].repeat(len(cells), 1, 1)
    if component == "resid_post":
        # the restored state is the input of block L + 1 (or the final residual for the last block)
        clean = state.clean.resid_post(cells[0][0])
        rows, pos = _row_pos(rows_of, [c[1] for c in cells])
        hidden[rows, pos] = clean[0, pos].to(hidden.dtype)
        if start == n:
            logits = lm.adapter.logits_from_resid(hidden[:, -1]).float()
        else:
            logits = run_from_layer(lm, state.clean, start, hidden, cancel)
    else:
        write = {}
        for L in range(start, n):
            restoring = [i for i, (layer, _) in enumerate(cells) if L in window_layers(layer, window, n)]
            if not restoring:
                continue
            rows, pos = _row_pos(rows_of[restoring], [cells[i][1] for i in restoring])
            clean = state.clean.acts[hook_name(L, component)]
            write[hook_name(L, component)] = _restorer(rows, pos, clean)
        with hooks(lm, write=write, cancel=cancel):
            logits = run_from_layer(lm, state.clean, start, hidden, cancel)
    probs = torch.softmax(logits, -1)[:, state.answer_id].float().cpu()
    return probs.view(len(cells), S).mean(1)


def start_layer(layer: int, component: str, window: int) -> int:
    """The first block a restored cell's rows go through (the layers before are the recorded noisy run)."""
    if component == "resid_post":
        return layer + 1
    return max(0, layer - window // 2)


def _row_pos(rows_of: torch.Tensor, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """Index arrays (row, position) restoring each cell's positions in each of its sample rows."""
    rows, pos = [], []
    for cell_rows, ps in zip(rows_of.tolist(), positions):
        for r in cell_rows:
            rows.extend([r] * len(ps))
            pos.extend(ps)
    return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def _restorer(rows, pos, clean):
    def write(act):
        act = act.clone()
        r, p = rows.to(act.device), pos.to(act.device)
        act[r, p] = clean[0].to(act.device, act.dtype)[p]
        return act
    return write


def causal_tracing_job(lm, pair: PromptPair, subject: str, noise: float = 3.0, samples: int = 10,
                       component: str = "resid_post", window: int = 10, seed: int = 0, name: str = "causal_tracing",
                       cancel: CancelToken | None = None, batch_size: int | None = None):
    cancel = cancel or CancelToken()
    if component not in TRACING_COMPONENTS:
        raise SpecError(f"causal tracing restores one of {', '.join(TRACING_COMPONENTS)}, not {component!r}.")
    if int(samples) < 1 or int(window) < 1 or not float(noise) >= 0:
        raise SpecError(f"samples and window must be at least 1 and noise at least 0 (got {samples}, {window}, {noise}).")
    samples, window = int(samples), int(window)
    require(lm, *checks_for_component(component), analysis=f"causal tracing of {component}")
    positions = subject_positions(pair.clean, subject)
    n, n_pos = lm.info.n_layers, pair.n_pos
    t0 = time.perf_counter()
    values = empty_values((n, n_pos))
    result = AnalysisResult(
        name=name, kind="causal_tracing",
        params=dict(subject=subject, noise=float(noise), samples=samples, component=component, window=window,
                    seed=int(seed)),
        dims=["layer", "position"], values=values,
        labels={"layer": [str(L) for L in range(n)], "position": pair.clean.labels()},
        tokens_clean=np.array(pair.clean.ids), tokens_corrupted=np.array(pair.clean.ids),
        extras={"subject_positions": np.array(positions, dtype=np.int64)})
    total = values.size
    yield Progress(0, total, "recording the clean run and the noisy copies")

    def cells():
        done = 0
        with torch.inference_mode():
            state = prepare_trace(lm, pair.clean.ids, pair.answer_id, positions, component, float(noise), samples,
                                  int(seed), cancel)
            result.clean_metric = float(torch.softmax(state.clean.logits_last, -1)[pair.answer_id])
            result.corrupted_metric = float(state.noisy_probs.mean())
            result.extras["embed_std"] = np.array([state.embed_std], dtype=np.float32)
            budget = RowBudget((batch_size or rows_per_batch(lm, n_pos)) // samples)
            groups: dict[int, list[tuple[int, int]]] = {}
            for L in range(n):
                groups.setdefault(start_layer(L, component, window), []).extend((L, t) for t in range(n_pos))
            for group in groups.values():
                def compute(chunk):
                    return restored_probs(lm, state, component, window, [(L, (t,)) for L, t in chunk], cancel)
                for chunk, probs in chunks_shrinking_on_oom(group, budget, compute, cancel, "traced cell"):
                    index = (np.array([L for L, _ in chunk]), np.array([t for _, t in chunk]))
                    vals = probs.numpy()
                    values[index] = vals
                    done += len(chunk)
                    yield Partial(index=index, values=vals)
                    yield Progress(done, total, f"layer {chunk[-1][0]}")
    return (yield from stream_cells(result, cells(), t0))

