"""Every analysis kind over a dataset of pairs, aggregated as contract 6.1 says.

Activation patching has its own batched path (`dataset_patching`: pairs batched together with the cells).
Attribution patching, ablation, causal tracing and SAE features run their single-pair job once per pair here
(they are already a few forward passes per pair, or batch their own cells) and the per-pair results are
stacked: values = mean over pairs, extras values_per_pair [pair, ...dims], sem, clean_metric /
corrupted_metric [pair]. `logit_diff_recovered` runs each pair with the raw logit difference and is normalised
by the dataset's mean clean and corrupted values (pair_metrics). Positions "named" run each pair over all its
positions and keep, per name, the column of that pair's own position, so pairs of different lengths line up.
"""
from __future__ import annotations

import time

import numpy as np

from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.metric_expr import MetricExpression
from desktop_app.engine.pair_metrics import (check_metric, check_wrong_answers, finish_dataset_result,
                                             padded_tokens, pairs_text, position_labels)
from desktop_app.engine.prompts import PromptPair
from desktop_app.engine.results import AnalysisResult, empty_values

_STEPS = 1000  # progress units per pair


def single_pair(pair) -> PromptPair:
    """The engine's one-pair object for a tokenised pair (answer lists stay tuples: log-sum-exp metrics)."""
    a = pair.answer_ids[0] if len(pair.answer_ids) == 1 else tuple(pair.answer_ids)
    if not pair.wrong_ids:
        w = a
    else:
        w = pair.wrong_ids[0] if len(pair.wrong_ids) == 1 else tuple(pair.wrong_ids)
    return PromptPair(clean=pair.clean, corrupted=pair.corrupted, answer_id=a, wrong_id=w)


def metric_for_pairs(lm, metric, pairs):
    """(the metric each single-pair job gets, whether the dataset result is normalised afterwards)."""
    metric = check_metric(metric)
    check_wrong_answers(metric, pairs)
    if isinstance(metric, MetricExpression):
        return metric.bind(lm.single_token_id), False
    if metric == "logit_diff_recovered":
        return "logit_diff", True
    return metric, False


def _check_positions(data, positions: str, both_prompts: bool) -> None:
    if positions == "named" and not data.position_names:
        raise SpecError("positions 'named' needs a dataset with position names (a template); use 'each' or 'all'.")
    if both_prompts:
        bad = [i for i, p in enumerate(data.pairs) if not p.same_length]
        if bad:
            p = data.pairs[bad[0]]
            raise PromptError(f"pair {bad[0]}: the clean prompt is {len(p.clean.ids)} tokens and the corrupted "
                              f"prompt {len(p.corrupted.ids)}; this analysis needs each pair's prompts to line up. "
                              f"clean: {' | '.join(p.clean.display)}  corrupted: {' | '.join(p.corrupted.display)}")
    if positions == "each" and not data.aligned:
        lengths = sorted({len(p.clean.ids) for p in data.pairs} | {len(p.corrupted.ids) for p in data.pairs})
        hint = "use positions 'named'" if data.position_names else "use prompts of one token length"
        raise SpecError(f"a position-resolved analysis over a dataset needs every prompt to have the same token "
                        f"length, but they have {', '.join(map(str, lengths))} tokens; {hint}.")


def per_pair_job(lm, data, kind: str, make_job, *, name: str, params: dict, positions: str = "all",
                 normalised: bool = False, select=None, named_prompt: int = 0, cancel: CancelToken | None = None):
    """Run make_job(pair index, PromptPair) for every pair and aggregate. `positions` "named" gathers each
    pair's named positions from the single results' position dim; `select(per_pair, first_result)` may narrow
    the per-pair array after the loop (returns (per_pair, labels)); named_prompt 1 reads the named positions of
    the corrupted prompt (kinds that run on it)."""
    from desktop_app.engine.jobs import drive

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    P = len(data)
    stacked, first, finished = [], None, 0
    clean_raw = np.full(P, np.nan, dtype=np.float32)
    corrupted_raw = np.full(P, np.nan, dtype=np.float32)
    status, message = "complete", ""
    yield Progress(0, P * _STEPS, f"pair 1 of {P}")
    for i, tp in enumerate(data.pairs):
        if cancel.cancelled:
            status, message = "partial", f"cancelled after {i} of {P} pairs"
            break

        def scaled(event, i=i):
            if isinstance(event, Progress) and event.total:
                return Progress(i * _STEPS + int(_STEPS * min(event.done, event.total) / event.total), P * _STEPS,
                                f"pair {i + 1} of {P}: {event.message}")
            return None
        job = make_job(i, single_pair(tp))
        events = []
        result = drive(job, events.append)
        for event in events:  # drive collects them: a single pair is short
            ev = scaled(event)
            if ev is not None:
                yield ev
        if result.status != "complete":
            status = "partial" if finished else ("cancelled" if "cancel" in result.message else "failed")
            message = f"stopped at pair {i} of {P}: {result.message}"
            break
        values = np.asarray(result.values, dtype=np.float32)
        if positions == "named":
            values = _named_columns(result, values, tp, data.position_names, named_prompt)
        if first is None:
            first = result
        elif values.shape != stacked[0].shape:
            raise SpecError(f"pair {i} gives a result of shape {values.shape} but pair 0 gives {stacked[0].shape}; "
                            "the pairs must tokenise to the same length.")
        stacked.append(values)
        clean_raw[i], corrupted_raw[i] = result.clean_metric, result.corrupted_metric
        finished += 1
    if first is None:
        raise SpecError(f"no pair of the dataset could be run: {message}")
    per_pair = np.full((P,) + stacked[0].shape, np.nan, dtype=np.float32)
    per_pair[:finished] = np.stack(stacked)
    labels = dict(first.labels)
    if "position" in first.dims:
        labels["position"] = list(data.position_names) if positions == "named" else position_labels(
            [p.clean for p in data.pairs])
    if select is not None:
        per_pair, labels = select(per_pair[:finished], first, labels)
        per_pair = np.concatenate([per_pair, np.full((P - finished,) + per_pair.shape[1:], np.nan, np.float32)])
    result = AnalysisResult(
        name=name, kind=kind, params={**{k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
                                      "pairs": P}, dims=list(first.dims),
        values=empty_values(per_pair.shape[1:]), labels=labels, status=status, message=message,
        tokens_clean=padded_tokens([p.clean for p in data.pairs]),
        tokens_corrupted=padded_tokens([p.corrupted for p in data.pairs]))
    undefined = [i for i in range(finished) if not np.isfinite(per_pair[i]).all()]
    finish_dataset_result(result, per_pair, clean_raw, corrupted_raw, normalised)
    if undefined:
        result.message = " ".join(m for m in [result.message, f"the metric is undefined (a division by zero) for "
                                              f"pairs {pairs_text(undefined)}; those values are left out of the "
                                              "mean."] if m)
    index = tuple(np.array(ix) for ix in np.indices(result.values.shape).reshape(result.values.ndim, -1))
    yield Partial(index=index, values=result.values[index].copy())
    yield Progress(P * _STEPS, P * _STEPS, "done")
    result.elapsed_s = time.perf_counter() - t0
    return result


def _named_columns(result, values: np.ndarray, pair, names, which: int) -> np.ndarray:
    axis = result.dims.index("position")
    cols = [pair.positions[n][which] for n in names]
    return np.take(values, cols, axis=axis)


# ---- the kinds -----------------------------------------------------------------------------------------------

def dataset_attribution_job(lm, data, component="resid_pre", positions="each", direction="denoise",
                            metric="logit_diff_recovered", name="attribution", layers=None, cancel=None):
    from desktop_app.engine.attribution import attribution_patching_job

    _check_positions(data, positions, both_prompts=True)
    single_metric, normalised = metric_for_pairs(lm, metric, data.pairs)
    single_positions = "each" if positions == "named" else positions
    return per_pair_job(
        lm, data, "attribution_patching",
        lambda i, pair: attribution_patching_job(lm, pair, component, single_positions, direction, single_metric,
                                                 name, layers, cancel),
        name=name, params=dict(component=component, positions=positions, direction=direction,
                               metric=_metric_label(metric)),
        positions=positions, normalised=normalised, cancel=cancel)


def dataset_ablation_job(lm, data, component="head_out", method="zero", positions="all", metric="logit_diff",
                         name="ablation", cancel=None, batch_size=None, **options):
    from desktop_app.engine.ablation import ablation_job

    _check_positions(data, positions, both_prompts=True)
    single_metric, normalised = metric_for_pairs(lm, metric, data.pairs)
    single_positions = "each" if positions == "named" else positions
    return per_pair_job(
        lm, data, "ablation",
        lambda i, pair: ablation_job(lm, pair, component=component, method=method, positions=single_positions,
                                     metric=single_metric, name=name, cancel=cancel, batch_size=batch_size,
                                     **options),
        name=name, params=dict(component=component, method=method, positions=positions,
                               metric=_metric_label(metric), **options),
        positions=positions, normalised=normalised, cancel=cancel)


def dataset_tracing_job(lm, data, subject: str, noise=3.0, samples=10, component="resid_post", window=10, seed=0,
                        name="causal_tracing", positions: str = "each", cancel=None, batch_size=None):
    """`subject` is text found in every clean prompt, or a position name whose text each pair gives (e.g.
    SUBJECT of the factual template)."""
    from desktop_app.engine.tracing import causal_tracing_job

    _check_positions(data, positions, both_prompts=False)
    multi = [i for i, p in enumerate(data.pairs) if len(p.answer_ids) != 1]
    if multi:
        raise SpecError(f"causal tracing reads the probability of one answer token, but pair {multi[0]} gives "
                        f"{len(data.pairs[multi[0]].answer_ids)}; give one answer per pair.")

    def subject_of(i, pair):
        if subject in data.position_names and subject in data.pairs[i].span_texts:
            return data.pairs[i].span_texts[subject]
        return subject
    return per_pair_job(
        lm, data, "causal_tracing",
        lambda i, pair: causal_tracing_job(lm, pair, subject_of(i, pair), noise, samples, component, window, seed,
                                           name, cancel, batch_size),
        name=name, params=dict(subject=subject, noise=float(noise), samples=int(samples), component=component,
                               window=int(window), seed=int(seed), positions=positions),
        positions=positions, cancel=cancel)


def dataset_sae_features_job(lm, data, sae, hook=None, top_k: int = 10, prompt: str = "clean", name="sae",
                             positions: str = "each", cancel=None):
    """Feature activations [position, feature] per pair; the features shown are chosen on the mean over pairs
    (all features with top_k 0, else the union over positions of each position's top-k of the mean)."""
    from desktop_app.engine.sae.inspect import feature_table
    from desktop_app.engine.sae.jobs import _as_sae, sae_features_job

    import torch

    if prompt not in ("clean", "corrupted"):
        raise SpecError("over a dataset, the SAE features prompt must be 'clean' or 'corrupted'.")
    _check_positions(data, positions, both_prompts=positions != "each" and prompt == "corrupted")
    sae_obj = _as_sae(sae, hook)

    def select(per_pair, first, labels):
        mean = np.nanmean(per_pair, axis=0)
        _, chosen = feature_table(torch.from_numpy(mean), int(top_k))
        chosen = [int(c) for c in chosen]
        return per_pair[..., chosen], {**labels, "feature": [str(c) for c in chosen]}

    return per_pair_job(
        lm, data, "sae_features",
        lambda i, pair: sae_features_job(lm, (pair.clean if prompt == "clean" else pair.corrupted).ids, sae_obj,
                                         hook, 0, name, cancel, prompt),
        name=name, params=dict(sae=str(sae), hook=hook, prompt=prompt, top_k=int(top_k), positions=positions),
        positions=positions, select=select, named_prompt=0 if prompt == "clean" else 1, cancel=cancel)


def _metric_label(metric):
    return metric.text if isinstance(metric, MetricExpression) else metric
