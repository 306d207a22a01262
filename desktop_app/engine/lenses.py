"""Logit lens, tuned lens and Jacobian lens: what each layer's residual stream already predicts.

The residual stream after block L (resid_post) at every position goes through the model's own final norm and
unembedding (adapter.logits_from_resid), directly (logit lens, nostalgebraist 2020), after the tuned lens's
translator for that layer, or after the Jacobian lens's J_L (engine/jacobian_lens.py). One forward pass records every layer; the grid is [layer, position]: the
probability of the target token. The target is the pair's answer, a literal single token, or "prediction":
at each position, the token the model itself predicts there (the last layer's top token).

Extras: top_token_ids / top_token_probs / top_token_text [layer, position, k], target_ids [position],
target_rank [layer, position] (0 = the lens's top token).
"""
from __future__ import annotations

import time

import numpy as np
import torch

from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress, stream_cells
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.results import AnalysisResult, empty_values
from desktop_app.engine.single_prompt import check_close

LENSES = ("logit", "tuned", "jacobian")
TARGETS = ("answer", "prediction")


def target_ids_for(lm, target: str, answer_id: int | None, final_logits: torch.Tensor) -> torch.Tensor:
    """The target token per position: [pos] long."""
    n_pos = final_logits.shape[0]
    if target == "prediction":
        return final_logits.argmax(-1)
    if target == "answer":
        if answer_id is None:
            raise SpecError("the target is the answer but no answer token is set; type one or choose 'prediction'.")
        return torch.full((n_pos,), int(answer_id), dtype=torch.long)
    return torch.full((n_pos,), lm.single_token_id(target, "lens target"), dtype=torch.long)


def _lens_transform(lm, lens: str, lens_path, force_hook: bool = False):
    if lens == "logit":
        return lambda layer, resid: resid
    if lens == "tuned":
        from desktop_app.engine.tuned_lens import load_tuned_lens

        tuned = load_tuned_lens(lens_path, lm, force_hook=force_hook)
        return tuned.transform_resid_post
    if lens == "jacobian":
        from desktop_app.engine.jacobian_lens import load_jacobian_lens

        jlens = load_jacobian_lens(lens_path, lm)
        last = lm.info.n_layers - 1

        def through_j(layer, resid):  # the last block's output is h_final itself: J is the identity there
            return resid if layer == last else jlens.transform_resid_post(layer, resid)
        return through_j
    raise SpecError(f"unknown lens {lens!r}; choose one of {', '.join(LENSES)}.")


def logit_lens_job(lm, tokens: TokenInfo, target: str = "answer", answer_id: int | None = None,
                   lens: str = "logit", lens_path=None, k: int = 5, name: str = "logit_lens",
                   prompt_label: str = "clean", cancel: CancelToken | None = None, force_hook: bool = False):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    transform = _lens_transform(lm, lens, lens_path, force_hook)
    n_layers, n_pos = lm.info.n_layers, len(tokens.ids)
    k = int(k)
    if not 1 <= k <= lm.info.vocab_size:
        raise SpecError(f"k must be between 1 and the vocabulary size {lm.info.vocab_size}, not {k}.")
    values = empty_values((n_layers, n_pos))
    top_ids = np.full((n_layers, n_pos, k), -1, dtype=np.int64)
    top_probs = np.full((n_layers, n_pos, k), np.nan, dtype=np.float32)
    ranks = np.full((n_layers, n_pos), -1, dtype=np.int64)
    result = AnalysisResult(
        name=name, kind="logit_lens",
        params=dict(lens=lens, lens_path=str(lens_path or ""), prompt=prompt_label, target=target, k=k),
        dims=["layer", "position"], values=values,
        labels={"layer": [str(L) for L in range(n_layers)], "position": tokens.labels()},
        tokens_clean=np.array(tokens.ids, dtype=np.int64),
        extras={"top_token_ids": top_ids, "top_token_probs": top_probs, "target_rank": ranks})

    def cells():
        yield Progress(0, values.size, "recording the residual stream")
        names = [hook_name(L, "resid_post") for L in range(n_layers)]
        logits, store = run_with_cache(lm, [tokens.ids], names, cancel=cancel)
        final = logits[0]
        targets = target_ids_for(lm, target, answer_id, final)
        result.extras["target_ids"] = targets.numpy().astype(np.int64)
        missing = []
        with torch.inference_mode():
            for L in range(n_layers):
                cancel.check()
                read = transform(L, store[names[L]].to(lm.input_device))
                if read is None:  # a Jacobian lens without a matrix for this layer: the row stays empty
                    missing.append(L)
                    continue
                lens_logits = lm.adapter.logits_from_resid(read)[0].float().cpu()
                if L == n_layers - 1:
                    check_close("the logit lens of the last layer", lens_logits, final,
                                computed_in=getattr(torch, lm.info.dtype, None))
                probs = torch.softmax(lens_logits, -1)
                p_target = probs.gather(-1, targets[:, None])[:, 0]
                values[L] = p_target.numpy()
                tp, ti = probs.topk(k, -1)
                top_probs[L], top_ids[L] = tp.numpy(), ti.numpy()
                ranks[L] = (probs > p_target[:, None]).sum(-1).numpy()
                yield Partial(index=(np.full(n_pos, L), np.arange(n_pos)), values=values[L].copy())
                yield Progress((L + 1) * n_pos, values.size, f"layer {L}")
        result.extras["top_token_text"] = token_texts(lm, top_ids)
        if missing:
            result.message = (f"the lens file has no Jacobian for layers {', '.join(map(str, missing))}; "
                              "those rows are empty.")
    return (yield from stream_cells(result, cells(), t0))


def token_texts(lm, ids: np.ndarray) -> np.ndarray:
    """The display text ('·Mary') of every id in `ids`, same shape (a unicode array, no pickle needed)."""
    flat = ids.reshape(-1)
    unique = sorted({int(i) for i in flat if i >= 0})
    if lm.tokenizer is not None and unique:
        shown = dict(zip(unique, lm.tokens_of_ids(unique).display))
    else:
        shown = {i: str(i) for i in unique}
    return np.array([shown.get(int(i), "") for i in flat], dtype=str).reshape(ids.shape)
