"""What a figure of a result shows when the result has more dims than a figure: a kind's `figure_slice` hook.

A kind whose leading dims are separate pictures (attention: one query x key pattern per layer and head) registers
`figure_slice=leading_slices(...)`; the exported figure, the command line's `export --layer/--head` and the
result pane's slice selectors then show one chosen slice instead of a sum. Kinds without the hook keep the
default: the figure sums the extra dims and says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from desktop_app.engine.errors import SpecError


@dataclass
class FigureSlice:
    """The 1-D or 2-D array a figure draws, its dims and labels (one list per dim), what was chosen for each
    dim left out (`chosen`: dim -> index into the result), and subtitle notes saying so."""

    values: np.ndarray
    dims: list[str]
    labels: list[list[str]]
    chosen: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _labels(result, dim: str, n: int) -> list[str]:
    given = (result.labels or {}).get(dim)
    return [str(x) for x in given] if given is not None and len(given) == n else [str(i) for i in range(n)]


def dim_labels(result, dim: str) -> list[str]:
    """The labels of one of the result's dims, one per index (numbers where none were given)."""
    return _labels(result, dim, np.shape(result.values)[list(result.dims).index(dim)])


def _resolve(dim: str, value, labels: list[str]) -> int:
    """An int is an index; a text is a label ("3": the model's layer 3, wherever it sits in the result)."""
    n = len(labels)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        index = int(value) + n if value < 0 else int(value)
        if 0 <= index < n:
            return index
        raise SpecError(f"{dim} index {value} is out of range; this result has {n} {dim}s (0 to {n - 1}).")
    text = str(value).strip()
    if text in labels:
        return labels.index(text)
    shown = ", ".join(labels[:20]) + (", …" if n > 20 else "")
    raise SpecError(f"this result has no {dim} {text!r}; choose one of {shown}.")


def leading_slices(keep: int = 2, defaults: dict | None = None) -> Callable:
    """A figure_slice hook that shows one index of every dim but the last `keep` (defaults: dim -> index or
    label when the selection does not name the dim; otherwise the first)."""
    defaults = dict(defaults or {})

    def figure_slice(result, selection: dict | None) -> FigureSlice:
        selection = dict(selection or {})
        values = np.asarray(result.values, dtype=np.float64)
        dims = list(result.dims)
        unknown = sorted(set(selection) - set(dims[:-keep]))
        if unknown:
            raise SpecError(f"a {result.kind} figure chooses its {', '.join(dims[:-keep]) or 'nothing'}, "
                            f"not {', '.join(unknown)}.")
        chosen, notes = {}, []
        for dim in dims[:-keep]:
            axis = dims.index(dim)
            labels = _labels(result, dim, values.shape[axis])
            index = _resolve(dim, selection.get(dim, defaults.get(dim, 0)), labels)
            chosen[dim] = index
            notes.append(f"{dim} {labels[index]} of {len(labels)}")
        for dim, index in chosen.items():
            axis = dims.index(dim)
            values = np.take(values, index, axis=axis)
            dims.pop(axis)
        labels = [_labels(result, d, n) for d, n in zip(dims, values.shape)]
        return FigureSlice(values, dims, labels, chosen, notes)

    return figure_slice


def figure_slice(result, selection: dict | None = None) -> FigureSlice | None:
    """The kind's chosen slice of `result` for a figure, or None when its kind has no figure_slice hook (the
    figure then sums the extra dims). SpecError for a selection the result does not have."""
    from desktop_app.project.kinds import find

    record = find(result.kind)
    hook = getattr(record, "figure_slice", None)
    if hook is None and selection:
        raise SpecError(f"a {result.kind} figure has no {', '.join(selection)} to choose; it shows "
                        f"{' x '.join(result.dims)}.")
    if hook is None or np.ndim(result.values) != len(result.dims):
        return None  # no hook, or a result without its array (failed before the first cell)
    return hook(result, selection)
