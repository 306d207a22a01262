"""The reading kinds over a dataset of pairs (contract 6.1): direct logit attribution, the logit lens and token
attribution run their single-prompt job once per pair through `dataset_runner.per_pair_job` (values = mean over
pairs, extras values_per_pair [pair, ...], sem).

Their scalar extras are kept per pair as `<name>_per_pair` [pair, ...] beside `<name>`, the mean over pairs
(so DLA's mean parts still add up to the mean logit difference). Position-resolved kinds (logit lens, token
attribution) line pairs up by position index when every prompt has the same token length, or by the dataset's
position names (a template); pairs of different lengths without names are refused.
"""
from __future__ import annotations

import warnings

import numpy as np

from desktop_app.engine.dataset_runner import _check_positions, per_pair_job
from desktop_app.engine.errors import SpecError

_PROMPTS = ("clean", "corrupted")


def _single(ids, what: str, i: int, kind: str) -> int:
    if len(ids) != 1:
        raise SpecError(f"{kind} reads one {what} token per pair, but pair {i} gives {len(ids)}; give one.")
    return int(ids[0])


def _prompt_of(prompt: str, kind: str) -> int:
    if prompt not in _PROMPTS:
        raise SpecError(f"over a dataset, the {kind} prompt must be clean or corrupted, not a literal text.")
    return _PROMPTS.index(prompt)


def _positions(data) -> str:
    return "named" if data.position_names and not data.aligned else "each"


def _keeping(job, kept: dict, i: int, names):
    """Run a single-pair job and keep the named extras of its result."""
    result = yield from job
    if result is not None and result.status == "complete":
        kept[i] = {k: np.asarray(result.extras[k], dtype=np.float32) for k in names if k in result.extras}
    return result


def _with_kept(job, kept: dict, n_pairs: int):
    """The dataset job, with every kept extra stacked as <name>_per_pair [pair, ...] (NaN for pairs not run) and
    averaged as <name>; an extra whose shape differs between pairs is left out."""
    result = yield from job
    if result is None or not kept:
        return result
    first = next(iter(kept.values()))
    for name, arr in first.items():
        if any(name not in k or k[name].shape != arr.shape for k in kept.values()):
            continue
        stacked = np.full((n_pairs,) + arr.shape, np.nan, dtype=np.float32)
        for i, k in kept.items():
            stacked[i] = k[name]
        result.extras[f"{name}_per_pair"] = stacked
        with warnings.catch_warnings():  # an all-NaN cell stays NaN without a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            result.extras[name] = np.nanmean(stacked, axis=0).astype(np.float32)
    return result


def dataset_dla_job(lm, data, granularity="heads", prompt="clean", name="direct_logit_attribution", cancel=None):
    from desktop_app.engine.dla import direct_logit_attribution_job

    which = _prompt_of(prompt, "direct logit attribution")
    ids = [(_single(p.answer_ids, "answer", i, "direct logit attribution"),
            _single(p.wrong_ids, "wrong answer", i, "direct logit attribution")) for i, p in enumerate(data.pairs)]
    kept: dict = {}
    names = ("embed", "bias", "logit_diff", "attn_layers", "mlp_layers")
    job = per_pair_job(
        lm, data, "direct_logit_attribution",
        lambda i, pair: _keeping(direct_logit_attribution_job(
            lm, (pair.clean, pair.corrupted)[which], *ids[i], granularity=granularity, name=name,
            prompt_label=prompt, cancel=cancel), kept, i, names),
        name=name, params=dict(prompt=prompt, granularity=granularity), positions="all", cancel=cancel)
    return _with_kept(job, kept, len(data))


def dataset_logit_lens_job(lm, data, target="answer", lens="logit", lens_path=None, k=5, prompt="clean",
                           name="logit_lens", cancel=None):
    from desktop_app.engine.lenses import logit_lens_job

    which = _prompt_of(prompt, "logit lens")
    positions = _positions(data)
    _check_positions(data, positions, both_prompts=False)
    answers = [_single(p.answer_ids, "answer", i, "the logit lens") if target == "answer" else None
               for i, p in enumerate(data.pairs)]
    return per_pair_job(
        lm, data, "logit_lens",
        lambda i, pair: logit_lens_job(lm, (pair.clean, pair.corrupted)[which], target=target, answer_id=answers[i],
                                       lens=lens, lens_path=lens_path, k=k, name=name, prompt_label=prompt,
                                       cancel=cancel),
        name=name, params=dict(lens=lens, lens_path=str(lens_path or ""), prompt=prompt, target=target, k=int(k),
                               positions=positions),
        positions=positions, named_prompt=which, cancel=cancel)


def dataset_token_attribution_job(lm, data, method="integrated_gradients", target="logit_diff", prompt="clean",
                                  name="token_attribution", batch_size=None, cancel=None, **options):
    from desktop_app.engine.token_attribution import target_label, target_metric, token_attribution_job

    which = _prompt_of(prompt, "token attribution")
    positions = _positions(data)
    _check_positions(data, positions, both_prompts=False)
    expression = target_metric(lm, target)
    if expression is not None:  # answer lists are log-sum-exp'd by the expression
        ids = [(tuple(p.answer_ids), tuple(p.wrong_ids) or None) for p in data.pairs]
    else:
        ids = [(_single(p.answer_ids, "answer", i, "token attribution"),
                _single(p.wrong_ids, "wrong answer", i, "token attribution") if target == "logit_diff" else None)
               for i, p in enumerate(data.pairs)]
    kept: dict = {}
    names = ("convergence_delta", "baseline_target", "sanity_delta", "deletion_curve")
    job = per_pair_job(
        lm, data, "token_attribution",
        lambda i, pair: _keeping(token_attribution_job(
            lm, (pair.clean, pair.corrupted)[which], *ids[i], method=method,
            target=expression if expression is not None else target, name=name, prompt_label=prompt,
            batch_size=batch_size, cancel=cancel, **options), kept, i, names),
        name=name, params=dict(method=method, target=target_label(target), prompt=prompt, positions=positions,
                               **options),
        positions=positions, named_prompt=which, cancel=cancel)
    return _with_kept(job, kept, len(data))
