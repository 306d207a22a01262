"""The project document: what one session holds and what a .iwb file stores.

Plain Python, no Qt: the window subscribes with a callback and repaints what changed. Every mutation goes
through a method here, so the change counter (dirty flag) and the observers never miss an edit.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from desktop_app.engine.errors import SpecError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project.specs import AnalysisSpec, ModelRef, Prompts

# Events passed to observers as observer(project, event, detail).
EVENTS = ("model", "prompts", "analyses", "spec", "result", "result_params", "view", "saved")

Observer = Callable[["Project", str, Any], None]


def model_fingerprint(model: ModelRef | None) -> dict | None:
    """What identifies the model a result was computed with: path, config hash and quantisation."""
    if model is None:
        return None
    return {"path": model.path, "config_hash": model.config_hash or "",
            "quantize": getattr(model, "quantize", "none") or "none"}


def same_model(a: dict | None, b: dict | None) -> bool:
    """True when two fingerprints name the same model (a missing config hash matches by path alone)."""
    if a is None or b is None:
        return a is b
    if a.get("quantize", "none") != b.get("quantize", "none"):
        return False
    if a.get("config_hash") and b.get("config_hash"):
        return a["config_hash"] == b["config_hash"] and a.get("path") == b.get("path")
    return a.get("path") == b.get("path")


def add_observer(observers: list, callback) -> Callable[[], None]:
    """Append `callback` to `observers`; returns a function that removes it again (safe to call twice)."""
    observers.append(callback)

    def unsubscribe():
        if callback in observers:
            observers.remove(callback)
    return unsubscribe


@dataclass
class AnalysisEntry:
    spec: AnalysisSpec
    result: AnalysisResult | None = None
    result_spec: AnalysisSpec | None = None  # the spec the result was computed from
    result_model: dict | None = None  # model_fingerprint() of the model the result was computed with

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def stale(self) -> bool:
        """True when the spec was edited after its result was computed."""
        return self.result is not None and self.result_spec is not None and self.result_spec != self.spec


def _check_jsonable(value, what: str):
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be plain JSON data (dict, list, str, number, bool, None): {e}") from None


class Project:
    def __init__(self, model: ModelRef | None = None, prompts: Prompts | None = None,
                 analyses: list[AnalysisEntry] | None = None, view_state: dict | None = None,
                 path: str | Path | None = None):
        self.model = model
        self.prompts = prompts if prompts is not None else Prompts(clean="")
        self.analyses: list[AnalysisEntry] = list(analyses or [])
        self.view_state: dict[str, Any] = dict(view_state or {})
        _check_jsonable(self.view_state, "view state")
        self.path = Path(path) if path is not None else None
        self.change_count = 0
        self._saved_count = 0
        self._observers: list[Observer] = []

    # ---- observers and the dirty flag ----

    def subscribe(self, callback: Observer) -> Callable[[], None]:
        """Call callback(project, event, detail) after each change; returns a function that unsubscribes."""
        return add_observer(self._observers, callback)

    def _changed(self, event: str, detail: Any = None) -> None:
        self.change_count += 1
        self._notify(event, detail)

    def _notify(self, event: str, detail: Any = None) -> None:
        for cb in list(self._observers):
            cb(self, event, detail)

    @property
    def dirty(self) -> bool:
        return self.change_count != self._saved_count

    def mark_saved(self, path: str | Path | None = None) -> None:
        if path is not None:
            self.path = Path(path)
        self._saved_count = self.change_count
        self._notify("saved", self.path)

    # ---- model and prompts ----

    def set_model(self, model: ModelRef | None) -> None:
        if model != self.model:
            self.model = model
            self._changed("model", model)

    def learn_config_hash(self, model: ModelRef) -> bool:
        """The loaded model is the project's model and only its config hash was not known yet (a demo, an
        experiment file), or only its load-time conformance measurements are new: record them without counting
        it as an edit. True when it did so."""
        if self.model is None or not model.config_hash:
            return False
        if self.model.config_hash and self.model.config_hash != model.config_hash:
            return False
        if replace(self.model, config_hash=model.config_hash, conformance=model.conformance) != model:
            return False
        self.model = model
        for entry in self.analyses:
            if entry.result_model is not None and entry.result_model.get("path") == model.path \
                    and not entry.result_model.get("config_hash"):
                entry.result_model = {**entry.result_model, "config_hash": model.config_hash}
        self._notify("model", model)
        return True

    def set_prompts(self, prompts: Prompts) -> None:
        if prompts != self.prompts:
            self.prompts = prompts
            self._changed("prompts", prompts)

    def set_prompt_field(self, field: str, value) -> None:
        if hasattr(self.prompts, "with_field"):  # a dataset: the field of its first pair (the one shown)
            self.set_prompts(self.prompts.with_field(field, value))
            return
        self.set_prompts(replace(self.prompts, **{field: value}))

    # ---- analyses ----

    def names(self) -> list[str]:
        return [e.name for e in self.analyses]

    def index_of(self, name: str) -> int:
        for i, e in enumerate(self.analyses):
            if e.name == name:
                return i
        raise SpecError(f"the project has no analysis named {name!r}; "
                        f"its analyses are {', '.join(self.names()) or 'none'}.")

    def entry(self, name: str) -> AnalysisEntry:
        return self.analyses[self.index_of(name)]

    def unique_name(self, base: str) -> str:
        names, n, name = set(self.names()), 2, base
        while name in names:
            name, n = f"{base} {n}", n + 1
        return name

    def add_analysis(self, spec: AnalysisSpec | AnalysisEntry, index: int | None = None) -> AnalysisEntry:
        entry = spec if isinstance(spec, AnalysisEntry) else AnalysisEntry(spec)
        if entry.name in self.names():
            raise SpecError(f"an analysis named {entry.name!r} already exists; choose another name.")
        self.analyses.insert(len(self.analyses) if index is None else index, entry)
        self._changed("analyses", entry.name)
        return entry

    def remove_analysis(self, name: str) -> tuple[int, AnalysisEntry]:
        i = self.index_of(name)
        entry = self.analyses.pop(i)
        self._changed("analyses", name)
        return i, entry

    def replace_spec(self, name: str, spec: AnalysisSpec) -> None:
        """Replace the spec of analysis `name` (the new spec may rename it); the result is kept, maybe stale."""
        i = self.index_of(name)
        if spec.name != name and spec.name in self.names():
            raise SpecError(f"an analysis named {spec.name!r} already exists; choose another name.")
        if self.analyses[i].spec != spec:
            self.analyses[i].spec = spec
            self._changed("spec", spec.name)

    def set_result(self, name: str, result: AnalysisResult | None, model: ModelRef | dict | None = None) -> None:
        """Store a computed (or partial) result and the model it was computed with (default: the project's
        model); not undoable, but it does make the project dirty."""
        entry = self.entry(name)
        entry.result = result
        entry.result_spec = entry.spec if result is not None else None
        if result is None:
            entry.result_model = None
        else:
            entry.result_model = model if isinstance(model, dict) else model_fingerprint(model or self.model)
        self._changed("result", name)

    def set_result_params(self, name: str, changes: dict) -> None:
        """Set (a value None: remove) entries of the params of `name`'s result that a view annotates it with (an
        attribution graph's pinned ids and supernodes): saved with the result, an edit that does not make it stale."""
        _check_jsonable(changes, "result params")
        params = self.entry(name).result.params
        for key, value in changes.items():
            if value is None:
                params.pop(key, None)
            else:
                params[key] = copy.deepcopy(value)
        self._changed("result_params", name)

    def stale_reason(self, name: str, loaded: ModelRef | None = None) -> str:
        """Why the result of `name` no longer matches (empty when it does): its spec was edited, or it was
        computed with another model than `loaded` (default: the project's model)."""
        entry = self.entry(name)
        if entry.result is None:
            return ""
        current = model_fingerprint(loaded if loaded is not None else self.model)
        if entry.result_model is not None and current is not None and not same_model(entry.result_model, current):
            m = entry.result_model
            quant = f", {m['quantize']}" if m.get("quantize", "none") != "none" else ""
            return f"computed with another model ({m.get('path')}{quant})"
        if entry.stale:
            return "its settings were edited after it was computed"
        return ""

    # ---- view state (JSON-able: open panes, selected hook points, colour ranges) ----

    def set_view(self, key: str, value: Any) -> None:
        _check_jsonable(value, f"view state {key!r}")
        if value is None and key not in self.view_state:
            return
        if self.view_state.get(key, _MISSING) != value:
            if value is None:
                self.view_state.pop(key, None)
            else:
                self.view_state[key] = copy.deepcopy(value)
            self._changed("view", key)

    def view(self, key: str, default: Any = None) -> Any:
        return copy.deepcopy(self.view_state.get(key, default))


_MISSING = object()
