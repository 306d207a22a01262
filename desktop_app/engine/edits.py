"""One edit mechanism for SAE features, directions and probes: a dict {hook name: write function} applied with
`engine.capture.hooks` (removed on any exit), and one runner that compares the model before and after it.

    writes = {"blocks.3.hook_resid_post": add_direction(v, coefficient=4.0)}     # a steering / probe direction
    writes = {hook: sae.inspect.edit_hook(sae, [FeatureEdit(12, "steer", 5.0)])}  # SAE features
    result = drive(intervention_job(lm, "Once upon a time", writes, n_continue=20))
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.results import AnalysisResult

WriteFn = Callable[[torch.Tensor], torch.Tensor]


def add_direction(direction, coefficient: float = 1.0, positions=None) -> WriteFn:
    """A write function adding coefficient * direction to the activation at `positions` (None = every
    position, as llama.cpp applies a control vector)."""
    vec = torch.as_tensor(np.asarray(direction), dtype=torch.float32).reshape(-1)
    coefficient = float(coefficient)

    def write(act: torch.Tensor) -> torch.Tensor:
        delta = (coefficient * vec).to(device=act.device, dtype=act.dtype)
        if positions is None:
            return act + delta
        idx = torch.as_tensor([p for p in positions if -act.shape[1] <= p < act.shape[1]], dtype=torch.long,
                              device=act.device)
        out = act.clone()
        out[:, idx] += delta
        return out

    return write


def greedy_continuation(lm, ids: torch.Tensor, n: int, writes: dict[str, WriteFn] | None,
                        cancel: CancelToken, first_logits: torch.Tensor | None = None) -> list[int]:
    """n greedy tokens (fewer at EOS or the context's end), each from a full forward pass with the writes;
    first_logits: the next-token logits of `ids` with these writes when already computed (saves a pass)."""
    eos = getattr(lm.tokenizer, "eos_token_id", None)
    n = max(0, min(int(n), int(lm.info.n_ctx) - ids.shape[1]))
    out: list[int] = []
    for step in range(n):
        cancel.check()
        if step == 0 and first_logits is not None:
            nxt = int(first_logits.argmax())
        else:
            with torch.inference_mode(), hooks(lm, write=writes or None, cancel=cancel):
                nxt = int(forward_logits(lm, ids, last_only=True)[0, -1].argmax())
        out.append(nxt)
        if eos is not None and nxt == eos:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]], dtype=ids.dtype)], dim=1)
    return out


def next_token_logits(lm, ids: torch.Tensor, writes: dict[str, WriteFn] | None, cancel: CancelToken) -> torch.Tensor:
    with torch.inference_mode(), hooks(lm, write=writes or None, cancel=cancel):
        return forward_logits(lm, ids, last_only=True)[0, -1].float().cpu()


def intervention_job(lm, text, writes: dict[str, WriteFn], n_continue: int = 20, top_n: int = 10,
                     cancel: CancelToken | None = None, name: str = "intervention", kind: str = "intervention",
                     params: dict | None = None, prepend_bos: bool | None = None):
    """values [which (before, after), rank]: probabilities of each distribution's top tokens; extras: their ids
    and strings, KL(before || after), the full probability shift `prob_shift` [vocab] (after - before), and the
    greedy continuations before / after."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    tokens = lm.tokenize(text, prepend_bos) if isinstance(text, str) else lm.tokens_of_ids(text)
    ids = as_ids(tokens.ids)
    total = 2 + 2 * max(0, int(n_continue))
    yield Progress(0, total, "next-token distributions")
    before = next_token_logits(lm, ids, None, cancel)
    after = next_token_logits(lm, ids, writes, cancel)
    logp_b, logp_a = torch.log_softmax(before, -1), torch.log_softmax(after, -1)
    p_b, p_a = logp_b.exp(), logp_a.exp()
    kl = float((p_b * (logp_b - logp_a)).sum())
    k = min(int(top_n), p_b.shape[0])
    top = [torch.topk(p, k) for p in (p_b, p_a)]
    yield Progress(2, total, "greedy continuation before")
    cont_before = greedy_continuation(lm, ids, n_continue, None, cancel, before)
    yield Progress(2 + int(n_continue), total, "greedy continuation after")
    cont_after = greedy_continuation(lm, ids, n_continue, writes, cancel, after)
    yield Progress(total, total, "done")
    top_ids = np.stack([t.indices.numpy() for t in top]).astype(np.int64)
    decode = lm.tokenizer.decode
    return AnalysisResult(
        name=name, kind=kind, params=dict(params or {}, n_continue=int(n_continue), hooks=sorted(writes)),
        dims=["which", "rank"], values=np.stack([t.values.numpy() for t in top]).astype(np.float32),
        labels={"which": ["before", "after"], "rank": [str(r + 1) for r in range(k)]},
        tokens_clean=np.array(tokens.ids, dtype=np.int64), elapsed_s=time.perf_counter() - t0,
        extras={"top_token_ids": top_ids,
                "top_tokens": np.array([lm.tokens_of_ids(row).display for row in top_ids.tolist()], dtype=str),
                "kl": np.array(kl, dtype=np.float32), "prob_shift": (p_a - p_b).numpy().astype(np.float32),
                "continuation": np.array([decode(cont_before), decode(cont_after)], dtype=str),
                "continuation_before_ids": np.array(cont_before, dtype=np.int64),
                "continuation_after_ids": np.array(cont_after, dtype=np.int64)})
