"""What a figure shows, before anything is painted: the result's values and labels as plotted, the title and
subtitle texts, and round tick values. Used by figure.py."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PySide6.QtGui import QFontMetricsF

from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds

MAX_BARS = 64  # beyond this a 1-D result is drawn as a line


# ----------------------------------------------------------------------------------------------- data

@dataclass
class FigureData:
    values: np.ndarray  # 1-D or 2-D, float64
    dims: list[str]
    labels: list[list[str]]
    notes: list[str] = field(default_factory=list)


def _clean_label(label) -> str:
    text = str(label)
    text = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text if len(text) <= 24 else text[:23] + "…"


def _labels_for(result: AnalysisResult, dim: str, n: int) -> list[str]:
    given = result.labels.get(dim)
    if given is None or len(given) != n:
        return [str(i) for i in range(n)]
    return [_clean_label(x) for x in given]


def prepare_data(result: AnalysisResult, selection: dict | None = None) -> FigureData:
    """The 1-D or 2-D array a figure draws. A kind with a figure_slice hook (attention: one layer's one head as
    query x key) shows the slice `selection` names ({dim: index or label}; else the kind's default); other
    results sum the dims a figure has no room for, and say so."""
    sliced = kinds.figure_slice(result, selection)
    if sliced is not None:
        values, dims, notes = np.asarray(sliced.values, dtype=np.float64), list(sliced.dims), list(sliced.notes)
        labels = [[_clean_label(x) for x in given] for given in sliced.labels]
    else:
        values, dims, notes = np.asarray(result.values, dtype=np.float64), list(result.dims), []
        labels = None
    if values.ndim == 0:
        values, dims, labels = values.reshape(1), ["value"], None
    while values.ndim > 2:
        axis = dims.index("position") if "position" in dims[1:] else values.ndim - 1
        n = values.shape[axis]
        values = values.sum(axis=axis)  # NaN propagates: a partly computed sum is not shown as a sum
        notes.append(f"summed over {dims.pop(axis)} ({n})")
        if labels is not None:
            labels.pop(axis)
    if labels is None:
        labels = [_labels_for(result, d, n) for d, n in zip(dims, values.shape)]
    return FigureData(values, dims, labels, notes)


def _fmt(v: float) -> str:
    return f"{v:.4g}".replace("-", "−")


def default_title(result: AnalysisResult) -> str:
    kind = result.kind.replace("_", " ")
    metric = result.params.get("metric")
    return f"{result.name} — {kind}" + (f", {metric}" if metric else "")


def value_name(result: AnalysisResult) -> str:
    """What the numbers are: the metric, or what the kind computes when it has no metric."""
    return kinds.value_label(result)


_GENERIC_NAMES = {"model", "models", "weights", "checkpoint", "hf", "snapshot", "main"}


def model_display_name(path: str) -> str:
    """A model's folder or file name; ".../demo/model" says more as "demo/model"."""
    p = Path(str(path).rstrip("/\\"))
    name = p.name or str(path)
    if name.lower() in _GENERIC_NAMES and p.parent.name:
        name = f"{p.parent.name}/{name}"
    return name


def _quoted(text: str, limit: int = 60) -> str:
    text = " ".join(str(text).split())
    return "“" + (text if len(text) <= limit else text[:limit - 1] + "…") + "”"


def figure_context(model: dict | None, prompts=None, kind_params: dict | None = None) -> list[str]:
    """Subtitle parts naming what a result was computed from: the model (its folder or file name, and a
    quantisation other than none) and the prompt(s)."""
    parts = []
    if model and model.get("path"):
        name = model_display_name(model["path"])
        quant = model.get("quantize", "none")
        parts.append(f"model {name}" + (f" ({quant})" if quant and quant != "none" else ""))
    if prompts is not None:
        if getattr(prompts, "clean", ""):
            parts.append(f"clean {_quoted(prompts.clean)}")
        if getattr(prompts, "corrupted", ""):
            parts.append(f"corrupted {_quoted(prompts.corrupted)}")
    return parts


def subtitle_lines(result: AnalysisResult, data: FigureData) -> list[str]:
    parts = []
    refs = [f"{name} {_fmt(v)}" for name, v in (("clean", result.clean_metric),
                                                 ("corrupted", result.corrupted_metric)) if np.isfinite(v)]
    parts.append(f"{value_name(result)}: " + ", ".join(refs) if refs else value_name(result))
    raw = kinds.raw_logit_diffs(result)
    if raw and value_name(result) != "logit_diff":
        parts.append("raw logit diff: " + ", ".join(f"{n} {_fmt(v)}" for n, v in raw.items()))
    for key in ("component", "direction", "positions", "subject", "hook", "prompt"):
        if result.params.get(key):
            parts.append(f"{key} {result.params[key]}")
    parts += data.notes
    if result.status != "complete":
        parts.append(f"status {result.status} ({result.done_fraction():.0%} computed)")
    if np.isnan(data.values).any():
        drawn_as_line = data.values.ndim == 1 and data.values.size > MAX_BARS
        parts.append("gaps: no value" if drawn_as_line else "hatched: no value")
    return parts


def wrap_text(parts: list[str], fm: QFontMetricsF, width: float, sep: str = "  ·  ") -> str:
    lines = [""]
    for part in parts:
        candidate = lines[-1] + sep + part if lines[-1] else part
        if lines[-1] and fm.horizontalAdvance(candidate) > width:
            lines.append(part)
        else:
            lines[-1] = candidate
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- ticks

def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (1, 2, 2.5, 5 x 10^k steps) inside [lo, hi]."""
    span = hi - lo
    if not np.isfinite(span) or span <= 0:
        return [lo]
    raw = span / max(target - 1, 1)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9)
    ticks = [k * step for k in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    return [0.0 if abs(t) < step * 1e-9 else t for t in ticks]


def _tick_text(ticks: list[float]) -> list[str]:
    """Tick labels with the fewest decimals that still show every tick exactly (0.25 needs two)."""
    for decimals in range(7):
        if all(abs(float(f"{t:.{decimals}f}") - t) <= 1e-9 * max(1.0, abs(t)) for t in ticks):
            break
    return [f"{t:.{decimals}f}".replace("-", "−") for t in ticks]


def value_ticks(lo: float, hi: float, target: int, with_ends: bool, min_gap: float = 0.0):
    """(value, text) ticks for a value axis; with_ends also labels the limits when they are not round
    and sit at least min_gap (a fraction of the axis) away from every round tick, so the colour bar's
    extremes can be read off."""
    ticks = nice_ticks(lo, hi, target)
    out = list(zip(ticks, _tick_text(ticks)))
    if with_ends:
        for end in (lo, hi):
            if all(abs(end - t) / (hi - lo) >= max(min_gap, 1e-9) for t in ticks):
                out.append((end, f"{end:.3g}".replace("-", "−")))
    return sorted(out)


def nice_step(minimum: float) -> int:
    """Smallest of 1, 2, 5, 10, 20, 50, ... that is at least `minimum`."""
    k = 1
    while True:
        for m in (1, 2, 5):
            if m * k >= minimum:
                return m * k
        k *= 10
