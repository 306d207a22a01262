"""The analysis-kind registry: one record per kind, looked up by the window, the CLI, the project file and export.

How to add a kind (one engine module + one registration + tests: three files, nothing else to edit)
---------------------------------------------------------------------------------------------------
1. `desktop_app/engine/my_kind.py`: the computation as a job, a generator that yields `Progress` / `Partial`
   and returns an `AnalysisResult` with `kind="my_kind"` (see engine/jobs.py; torch only in here).
2. `desktop_app/project/kinds/my_kind.py`: the spec and its registration. Modules in this package are imported
   automatically (built-ins first, then the rest in alphabetical order), so no list needs editing:

       from dataclasses import dataclass
       from desktop_app.project.kinds import AnalysisKind, ExportFormat, prompt_text, register_kind
       from desktop_app.project.specs import AnalysisSpec, param

       @dataclass(frozen=True)
       class MyKindSpec(AnalysisSpec):
           prompt: str = param("clean", widget="choice", choices=("clean", "corrupted"), editable=True,
                               tip="clean, corrupted, or a literal text")
           k: int = param(10, widget="int", minimum=1, maximum=100, tip="How many ...")

       def _job(lm, prompts, spec, cancel, batch_size):
           from desktop_app.engine.my_kind import my_kind_job   # torch stays off the import path
           return my_kind_job(lm, prompt_text(prompts, spec.prompt), k=spec.k, name=spec.name, cancel=cancel)

       register_kind(AnalysisKind(kind="my_kind", label="My kind", spec=MyKindSpec, job=_job,
                                  dims="[layer, position]", value_name="probability", scale="sequential",
                                  view="heatmap", click="describe"))

   `param()` metadata builds the Analysis panel's row (widget, default, range / choices, tooltip) and is
   checked by `AnalysisSpec.validate`, so most specs need no validate() of their own. Give every field a
   param() with a tip: tests/project/test_project_kinds.py checks each registered kind for it, and
   tests/ui/test_window_kinds.py builds each kind's panel rows in the real window. `view` picks an existing
   view type of the window (VIEW_TYPES), `click` what a click on a cell shows (CLICK_TYPES), `scale` the
   colour scale. `exports` adds formats to `interp-workbench export --format` (e.g. gguf, json).
3. `tests/engine/test_my_kind.py`: the engine against an independent reference, and the kind through
   `analysis_job` / `run_experiment` / a project round trip (tests/project/test_project_kinds.py shows how).

This package is Qt-free and torch-free: engine modules are imported inside the job factories.
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from desktop_app.engine.errors import SpecError
from desktop_app.project import specs as _specs
from desktop_app.project.specs import AnalysisSpec, Prompts

VIEW_TYPES = ("heatmap", "bars", "line", "token_strip", "feature_table", "lens_grid", "attention_pattern", "graph")
CLICK_TYPES = ("describe", "predictions", "patched_predictions", "select_token", "details")
SCALES = ("diverging", "sequential")
_BUILTIN_MODULES = ("patching", "tracing", "ablation", "sae_features")  # their order is the panel's order


@dataclass(frozen=True)
class ExportFormat:
    """An extra `export --format NAME` of a kind: write(result, path) writes the file (atomically) at path."""
    name: str
    write: Callable[[Any, Path], Any]
    description: str = ""


@dataclass(frozen=True)
class AnalysisKind:
    kind: str  # the tag in experiment and project files
    label: str  # the Analysis panel's name of the kind
    spec: type[AnalysisSpec]
    job: Callable[..., Any]  # job(lm, prompts, spec, cancel, batch_size) -> generator returning AnalysisResult
    dims: str  # the result's dims, for people: "[layer, position]"
    value_name: str | Callable[[dict], str] = "value"  # a text, or params -> text (e.g. the metric)
    scale: str = "diverging"  # diverging: centred on 0; sequential: 0 .. max
    view: str = "heatmap"
    click: str = "describe"
    exports: tuple[ExportFormat, ...] = ()
    # (result, selection {dim: index or label}) -> FigureSlice: the 2-D (or 1-D) array, dims and labels a figure
    # of a result with more dims shows (kinds._figure.leading_slices); None: the figure sums the extra dims
    figure_slice: Callable[[Any, dict | None], Any] | None = None
    short: str = ""  # the name of new analyses of this kind: "<component> <short>"; default: the label
    name_for: Callable[[dict], str] | None = None  # field values -> the name of a new analysis (instead of short)
    skeleton: Callable[..., Any] | None = None  # (lm, prompts, spec) -> empty result to stream cells into
    # job over a dataset of pairs (prompts a DatasetPrompts), same signature as job; None: one pair only
    dataset_job: Callable[..., Any] | None = None
    description: str = ""
    details: Callable[[Any, dict], str] | None = None  # click "details": (result, {dim: index}) -> plain text

    def __post_init__(self):
        if not self.kind or not self.kind.replace("_", "").isalnum():
            raise ValueError(f"kind {self.kind!r} must be a non-empty identifier")
        if not (isinstance(self.spec, type) and issubclass(self.spec, AnalysisSpec)):
            raise ValueError(f"kind {self.kind!r}: spec must be an AnalysisSpec subclass")
        for what, value, allowed in (("view", self.view, VIEW_TYPES), ("click", self.click, CLICK_TYPES),
                                     ("scale", self.scale, SCALES)):
            if value not in allowed:
                raise ValueError(f"kind {self.kind!r}: {what} {value!r} is not one of {', '.join(allowed)}")

    def value_label(self, params: dict | None) -> str:
        """What the result's numbers are (the colour bar's and the axis's label)."""
        if callable(self.value_name):
            return str(self.value_name(params or {}))
        return self.value_name

    def new_name(self, values: dict) -> str:
        """A name for a new analysis of this kind with these field values (the panel's Run)."""
        if self.name_for is not None:
            return self.name_for(values)
        short = self.short or self.label.lower()
        component = values.get("component")
        name = f"{component} {short}" if isinstance(component, str) and component else short
        if values.get("positions") == "all":
            name += " (all positions)"
        return name

    def export_format(self, name: str) -> ExportFormat | None:
        return next((f for f in self.exports if f.name == name), None)


_KINDS: dict[str, AnalysisKind] = {}
LOAD_ERRORS: dict[str, str] = {}  # kind module -> why it could not be imported (the other kinds still work)
_loaded = False


def register_kind(record: AnalysisKind) -> AnalysisKind:
    """Add a kind. A kind name can be registered once (a second module with the same kind is a bug)."""
    if record.kind in _KINDS and _KINDS[record.kind] is not record:
        raise ValueError(f"analysis kind {record.kind!r} is registered twice")
    record.spec.kind = record.kind
    _specs.ANALYSIS_KINDS[record.kind] = record.spec
    _KINDS[record.kind] = record
    return record


def _unregister(kind: str) -> None:
    """Remove a kind (tests that register a kind of their own clean up with this)."""
    _KINDS.pop(kind, None)
    _specs.ANALYSIS_KINDS.pop(kind, None)


def load() -> None:
    """Import every kind module of this package once (built-ins first, then the others by name)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    others = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
    for name in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{name}")
    for name in others:
        if name in _BUILTIN_MODULES:
            continue
        try:
            importlib.import_module(f"{__name__}.{name}")
        except Exception as err:  # noqa: BLE001 - one broken kind module must not take the others down
            LOAD_ERRORS[name] = f"{type(err).__name__}: {err}"


def all_kinds() -> list[AnalysisKind]:
    load()
    return list(_KINDS.values())


def get(kind: str) -> AnalysisKind:
    """The record of `kind`; SpecError naming the known kinds when there is none."""
    load()
    record = _KINDS.get(kind) if isinstance(kind, str) else None
    if record is None:
        broken = "".join(f" The kind module {m} failed to load ({e})." for m, e in LOAD_ERRORS.items())
        raise SpecError(f"analysis kind {kind!r} is not known to this version; known kinds are "
                        f"{', '.join(_KINDS)}. Remove it or update the app.{broken}")
    return record


def find(kind: str) -> AnalysisKind | None:
    """The record of `kind`, or None (a result of a kind this version does not know is still shown)."""
    load()
    return _KINDS.get(kind)


def value_label(result) -> str:
    """What a result's numbers are: the kind's value name, or the metric, or "value"."""
    record = find(result.kind)
    if record is not None:
        return record.value_label(result.params)
    return str((result.params or {}).get("metric") or "value")


def scale_of(result) -> str:
    record = find(result.kind)
    return record.scale if record is not None else "diverging"


def extra_export_formats() -> dict[str, list[str]]:
    """Every extra export format name -> the kinds that offer it."""
    out: dict[str, list[str]] = {}
    for record in all_kinds():
        for f in record.exports:
            out.setdefault(f.name, []).append(record.kind)
    return out


# ---- helpers for job factories ------------------------------------------------------------------------------

def prompt_pair(lm, prompts: Prompts, need_corrupted: bool = True, need_wrong: bool = True):
    """The tokenised clean / corrupted pair with answer tokens (engine.prompts.prepare_pair)."""
    from desktop_app.engine.prompts import prepare_pair

    return prepare_pair(lm, prompts.clean, prompts.corrupted, prompts.answer, prompts.wrong_answer,
                        prompts.prepend_bos, need_corrupted=need_corrupted, need_wrong=need_wrong)


def with_raw_logit_diffs(lm, pair, job):
    """Run `job` and add the raw logit differences logit(answer) - logit(wrong) of the clean and corrupted runs
    to its result (extras `clean_logit_diff`, `corrupted_logit_diff`), so a normalised metric is shown beside
    the numbers it was normalised by. Two plain forward passes; nothing when the pair has no wrong answer."""
    result = yield from job
    if result is None or pair is None or pair.wrong_id == pair.answer_id or result.status == "failed":
        return result
    import torch

    from desktop_app.engine.capture import as_ids, forward_logits

    with torch.inference_mode():
        for what, info in (("clean", pair.clean), ("corrupted", pair.corrupted)):
            if info is None or not len(info.ids) or (what == "corrupted" and info is pair.clean):
                continue  # no corrupted prompt was given: the pair holds the clean one twice
            logits = forward_logits(lm, as_ids(info.ids), last_only=True)[0, -1].float()
            result.extras[f"{what}_logit_diff"] = np.asarray(float(logits[pair.answer_id] - logits[pair.wrong_id]))
    return result


def raw_logit_diffs(result) -> dict[str, float]:
    """{"clean": ..., "corrupted": ...}: the raw logit differences a result carries (see with_raw_logit_diffs)."""
    out = {}
    for what in ("clean", "corrupted"):
        arr = result.extras.get(f"{what}_logit_diff") if result.extras else None
        if arr is not None and np.asarray(arr).size == 1 and np.isfinite(float(np.asarray(arr))):
            out[what] = float(np.asarray(arr))
    return out


def prompt_text(prompts: Prompts, which: str) -> str:
    """A spec's `prompt` field: "clean", "corrupted" or a literal text."""
    if which == "clean":
        return prompts.clean
    if which == "corrupted":
        return prompts.corrupted
    return which


def field_values(spec: AnalysisSpec) -> dict[str, Any]:
    """The spec's fields without name and kind (the `params` a result records)."""
    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "name"}


from desktop_app.project.kinds._figure import FigureSlice, figure_slice, leading_slices  # noqa: E402

__all__ = ["AnalysisKind", "CLICK_TYPES", "ExportFormat", "SCALES", "VIEW_TYPES", "all_kinds",
           "extra_export_formats", "field_values", "find", "get", "load", "prompt_pair", "prompt_text",
           "raw_logit_diffs", "register_kind", "scale_of", "value_label", "with_raw_logit_diffs"]
__all__ += ["FigureSlice", "figure_slice", "leading_slices"]
