"""Analysis results: an array with named dims, labels per dim, and the provenance of the run (numpy only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

STATUSES = ("complete", "partial", "cancelled", "failed")


@dataclass
class AnalysisResult:
    name: str
    kind: str
    params: dict[str, Any]
    dims: list[str]
    values: np.ndarray
    labels: dict[str, list] = field(default_factory=dict)  # per dim name: a label per index
    status: str = "complete"
    message: str = ""
    tokens_clean: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    tokens_corrupted: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    clean_metric: float = float("nan")
    corrupted_metric: float = float("nan")
    elapsed_s: float = 0.0
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # further named arrays a kind wants to keep

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, not {self.status!r}")
        self.values = np.asarray(self.values)
        if self.values.ndim != len(self.dims):
            raise ValueError(f"values have {self.values.ndim} dims but dims names {self.dims}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    def done_fraction(self) -> float:
        if self.values.size == 0:
            return 1.0
        return float(np.isfinite(self.values).sum()) / self.values.size


def empty_values(shape) -> np.ndarray:
    """A result array before any cell is computed: NaN everywhere."""
    return np.full(shape, np.nan, dtype=np.float32)
