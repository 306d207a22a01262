"""Metrics over a dataset of pairs: each row of logits is read with its own pair's answer tokens, and results
are aggregated as contract 6.1 says.

Normalisation (`logit_diff_recovered`, as TransformerLens's IOI notebooks do): with LD the logit difference,

    values_per_pair[i] = (LD_patched[i] - mean_j LD_corrupted[j]) / (mean_j LD_clean[j] - mean_j LD_corrupted[j])
    values             = mean_i values_per_pair[i]
                       = (mean LD_patched - mean LD_corrupted) / (mean LD_clean - mean LD_corrupted)

so the mean of the per-pair values is the normalised mean, and `clean_metric` / `corrupted_metric` per pair are
normalised the same way (their means are 1 and 0). Other metrics are not normalised. `sem` is the standard
error of the mean over the pairs with a finite value (sample standard deviation / sqrt(n); NaN below 2 pairs).
"""
from __future__ import annotations

import numpy as np
import torch

from desktop_app.engine.errors import SpecError
from desktop_app.engine.metric_expr import BUILTIN_EXPRESSIONS, MetricExpression, TokenSets, parse_metric
from desktop_app.engine.metrics import METRICS


def metric_needs_wrong(metric) -> bool:
    metric = parse_metric(metric)
    if isinstance(metric, MetricExpression):
        return metric.uses("wrong")
    return metric in ("logit_diff", "logit_diff_recovered")


def check_metric(metric):
    metric = parse_metric(metric)
    if not isinstance(metric, MetricExpression) and metric not in METRICS:
        raise SpecError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)} or write "
                        "{\"expression\": ...}.")
    return metric


def check_wrong_answers(metric, pairs) -> None:
    """Refuse a metric that reads the wrong answer on pairs tokenised without one (it would read a stand-in)."""
    missing = [i for i, p in enumerate(pairs) if not p.wrong_ids]
    if missing and metric_needs_wrong(metric):
        label = metric.text if isinstance(metric, MetricExpression) else metric
        raise SpecError(f"the metric {label} reads the wrong answer, but pair {missing[0]} has none; give every "
                        "pair a wrong_answer.")


class DatasetMetric:
    """Raw per-row metric values for rows of last-position logits, each row belonging to a pair."""

    def __init__(self, lm, metric, pairs):
        self.metric = check_metric(metric)
        check_wrong_answers(self.metric, pairs)
        self.answer = TokenSets.of([p.answer_ids for p in pairs])
        self.wrong = TokenSets.of([p.wrong_ids or (0,) for p in pairs])
        text = self.metric.text if isinstance(self.metric, MetricExpression) else \
            BUILTIN_EXPRESSIONS.get("logit_diff" if self.metric == "logit_diff_recovered" else self.metric)
        self.bound = MetricExpression(text).bind(lm.single_token_id) if text else None
        self.normalised = self.metric == "logit_diff_recovered"

    @property
    def label(self) -> str:
        return self.metric.text if isinstance(self.metric, MetricExpression) else self.metric

    def raw(self, logits: torch.Tensor, pair_index, clean_logprobs: torch.Tensor | None = None):
        """(values [rows], divided_by_zero [rows]) for logits [rows, vocab]; kl_div needs each row's clean
        log-probabilities [rows, vocab]."""
        pair_index = torch.as_tensor(pair_index, dtype=torch.long)
        if self.metric == "kl_div":
            ref = clean_logprobs.to(logits.device).float()
            kl = (ref.exp() * (ref - torch.log_softmax(logits.float(), -1))).sum(-1)
            return kl, torch.zeros_like(kl, dtype=torch.bool)
        return self.bound(logits, self.answer.rows(pair_index), self.wrong.rows(pair_index))


def normalise(per_pair: np.ndarray, clean_raw: np.ndarray, corrupted_raw: np.ndarray):
    """(normalised per-pair values, message): see the module docstring; raw values when the means are equal."""
    m_clean, m_corr = float(np.nanmean(clean_raw)), float(np.nanmean(corrupted_raw))
    if not abs(m_clean - m_corr) > 1e-6:
        return per_pair, ("the mean clean and corrupted logit differences are equal, so the recovered fraction is "
                          "undefined; values are raw logit differences.")
    return (per_pair - m_corr) / (m_clean - m_corr), ""


def mean_and_sem(per_pair: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 and its standard error, over the pairs whose value is finite."""
    finite = np.isfinite(per_pair)
    n = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        total = np.where(finite, per_pair, 0.0).sum(0, dtype=np.float64)
        mean = total / n
        sq = np.where(finite, (per_pair - mean) ** 2, 0.0).sum(0, dtype=np.float64)
        sem = np.sqrt(sq / (n - 1)) / np.sqrt(n)
    mean = np.where(n > 0, mean, np.nan)
    sem = np.where(n > 1, sem, np.nan)
    return mean.astype(np.float32), sem.astype(np.float32)


def running_mean(per_pair: np.ndarray, clean_raw: np.ndarray, corrupted_raw: np.ndarray,
                 normalised: bool) -> np.ndarray:
    """The mean over the pairs finished so far (what a live view shows while a dataset sweep runs)."""
    if normalised:
        per_pair = normalise(per_pair, clean_raw, corrupted_raw)[0]
    return mean_and_sem(per_pair)[0]


def pairs_text(pairs) -> str:
    pairs = sorted(int(p) for p in pairs)
    shown = ", ".join(str(p) for p in pairs[:10]) + (f" and {len(pairs) - 10} more" if len(pairs) > 10 else "")
    return shown


def finish_dataset_result(result, per_pair: np.ndarray, clean_raw: np.ndarray, corrupted_raw: np.ndarray,
                          normalised: bool, zero_pairs=()) -> None:
    """Fill a dataset result: values (mean), extras values_per_pair / sem / clean_metric / corrupted_metric
    (per pair), clean_metric / corrupted_metric (their means), and the message."""
    messages = []
    if normalised:
        result.extras["clean_logit_diff"] = clean_raw.astype(np.float32)
        result.extras["corrupted_logit_diff"] = corrupted_raw.astype(np.float32)
        per_pair, warn = normalise(per_pair, clean_raw, corrupted_raw)
        clean, corrupted = normalise(clean_raw, clean_raw, corrupted_raw)[0], normalise(corrupted_raw, clean_raw,
                                                                                       corrupted_raw)[0]
        if warn:
            messages.append(warn)
    else:
        clean, corrupted = clean_raw, corrupted_raw
    mean, sem = mean_and_sem(per_pair)
    result.values = mean.reshape(result.values.shape)
    result.extras["values_per_pair"] = per_pair.astype(np.float32)
    result.extras["sem"] = sem.reshape(result.values.shape)
    result.extras["clean_metric"] = np.asarray(clean, dtype=np.float32)
    result.extras["corrupted_metric"] = np.asarray(corrupted, dtype=np.float32)
    result.clean_metric = float(np.nanmean(clean)) if np.isfinite(clean).any() else float("nan")
    result.corrupted_metric = float(np.nanmean(corrupted)) if np.isfinite(corrupted).any() else float("nan")
    if len(zero_pairs):
        messages.append(f"the metric divides by zero for pairs {pairs_text(zero_pairs)}; those values are left out "
                        "of the mean.")
    if messages:
        result.message = " ".join(m for m in [result.message, *messages] if m)


def padded_tokens(infos) -> np.ndarray:
    """[pair, position] token ids, -1 after a shorter prompt's end."""
    n = max(len(t.ids) for t in infos)
    out = np.full((len(infos), n), -1, dtype=np.int64)
    for i, t in enumerate(infos):
        out[i, :len(t.ids)] = t.ids
    return out


def position_labels(infos) -> list[str]:
    """"i: token" where every pair has the same token at i, "i: *" where they differ."""
    labels = []
    for i in range(len(infos[0].ids)):
        shown = {t.display[i] for t in infos}
        labels.append(f"{i}: {shown.pop()}" if len(shown) == 1 else f"{i}: *")
    return labels
