"""Metrics read at the last position of a run, from last-position logits [batch, vocab].

`metric` is a built-in name or a bound metric expression (`metric_expr.BoundMetric`); `answer_id` / `wrong_id`
are a token id or a tuple of ids (several spellings of one answer: the log-sum-exp of their logits)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("logit_diff", "logit_diff_recovered", "answer_prob", "kl_div")


@dataclass
class MetricContext:
    metric: object  # a name of METRICS or a metric_expr.BoundMetric
    answer_id: int | tuple
    wrong_id: int | tuple
    clean_logits: torch.Tensor  # [vocab] float32 CPU
    corrupted_logits: torch.Tensor
    normalise: bool = True  # False when clean and corrupted logit differences are equal (then raw values)

    def __post_init__(self):
        self.clean_logprobs = torch.log_softmax(self.clean_logits.float(), -1)
        self.ld_clean = float(_ld(self.clean_logits[None], self.answer_id, self.wrong_id)[0])
        self.ld_corrupted = float(_ld(self.corrupted_logits[None], self.answer_id, self.wrong_id)[0])
        if self.metric == "logit_diff_recovered" and abs(self.ld_clean - self.ld_corrupted) < 1e-6:
            self.normalise = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row of `logits` [batch, vocab] (any device), a float tensor [batch] (differentiable)."""
        logits = logits.float()
        a, w = self.answer_id, self.wrong_id
        if not isinstance(self.metric, str):
            from desktop_app.engine.metric_expr import TokenSets

            rows = logits.shape[0]
            return self.metric(logits, TokenSets.of([a] * rows), TokenSets.of([w] * rows))[0]
        if self.metric in ("logit_diff", "logit_diff_recovered"):
            ld = _ld(logits, a, w)
            if self.metric == "logit_diff" or not self.normalise:
                return ld
            return (ld - self.ld_corrupted) / (self.ld_clean - self.ld_corrupted)
        if self.metric == "answer_prob":
            return pick(torch.log_softmax(logits, -1), a).exp()
        if self.metric == "kl_div":
            ref = self.clean_logprobs.to(logits.device)
            return (ref.exp() * (ref - torch.log_softmax(logits, -1))).sum(-1)
        raise ValueError(self.metric)

    @property
    def clean_value(self) -> float:
        return float(self(self.clean_logits[None])[0])

    @property
    def corrupted_value(self) -> float:
        return float(self(self.corrupted_logits[None])[0])

    @property
    def warning(self) -> str:
        if self.metric == "logit_diff_recovered" and not self.normalise:
            return ("the clean and corrupted logit differences are equal, so the recovered fraction is undefined; "
                    "values are raw logit differences.")
        return ""


def pick(values: torch.Tensor, ids) -> torch.Tensor:
    """values[:, id] for one token id; the log-sum-exp over the ids for several."""
    if isinstance(ids, (tuple, list)):
        if len(ids) == 1:
            return values[:, ids[0]]
        return torch.logsumexp(values[:, list(ids)], -1)
    return values[:, ids]


def _ld(logits: torch.Tensor, a, w) -> torch.Tensor:
    return pick(logits.float(), a) - pick(logits.float(), w)
