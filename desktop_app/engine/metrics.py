"""Metrics read at the last position of a run, from last-position logits [batch, vocab]."""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("logit_diff", "logit_diff_recovered", "answer_prob", "kl_div")


@dataclass
class MetricContext:
    metric: str
    answer_id: int
    wrong_id: int
    clean_logits: torch.Tensor  # [vocab] float32 CPU
    corrupted_logits: torch.Tensor
    normalise: bool = True  # False when clean and corrupted logit differences are equal (then raw values)

    def __post_init__(self):
        self.clean_logprobs = torch.log_softmax(self.clean_logits.float(), -1)
        self.ld_clean = float(self.clean_logits[self.answer_id] - self.clean_logits[self.wrong_id])
        self.ld_corrupted = float(self.corrupted_logits[self.answer_id] - self.corrupted_logits[self.wrong_id])
        if self.metric == "logit_diff_recovered" and abs(self.ld_clean - self.ld_corrupted) < 1e-6:
            self.normalise = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """Per row of `logits` [batch, vocab] (any device), a float tensor [batch] (differentiable)."""
        logits = logits.float()
        a, w = self.answer_id, self.wrong_id
        if self.metric in ("logit_diff", "logit_diff_recovered"):
            ld = logits[:, a] - logits[:, w]
            if self.metric == "logit_diff" or not self.normalise:
                return ld
            return (ld - self.ld_corrupted) / (self.ld_clean - self.ld_corrupted)
        if self.metric == "answer_prob":
            return torch.softmax(logits, -1)[:, a]
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
