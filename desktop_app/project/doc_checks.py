"""Type checks on every field of a project.json before a loader touches it, so a damaged or hostile file
gets one sentence naming the field (`analyses[2].result.dims`) instead of a KeyError deep in a loader.

Fields these checks do not know are left alone (newer kinds and datasets add their own); the loaders and
the spec classes check the values of the fields they read.
"""
from __future__ import annotations

import numbers
from typing import Any

from desktop_app.engine.results import STATUSES
from desktop_app.engine.bounded_io import BoundedReadError

_SCALAR = (str, int, float, bool, type(None))


def _fail(where: str, what: str, value: Any) -> None:
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    raise BoundedReadError(f"its field {where} must be {what}, not {shown}")


def _obj(doc: dict, key: str, where: str, *, required: bool = False, none_ok: bool = True) -> Any:
    if key not in doc:
        if required:
            raise BoundedReadError(f"it lacks the field {where}")
        return None
    value = doc[key]
    if value is None and none_ok and not required:
        return None
    return value


def _check(value, where: str, kind: str) -> None:
    ok = {
        "object": lambda v: isinstance(v, dict),
        "list": lambda v: isinstance(v, list),
        "text": lambda v: isinstance(v, str),
        "whole number": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool),
    }[kind]
    if not ok(value):
        _fail(where, {"object": "a JSON object", "list": "a list", "text": "text",
                      "whole number": "a whole number", "number": "a number"}[kind], value)


def _opt(doc: dict, key: str, where: str, kind: str, *, required: bool = False) -> Any:
    value = _obj(doc, key, where, required=required)
    if value is not None:
        _check(value, where, kind)
    return value


def _str_list(value, where: str) -> None:
    _check(value, where, "list")
    for i, item in enumerate(value):
        _check(item, f"{where}[{i}]", "text")


def _labels(value, where: str) -> None:
    _check(value, where, "object")
    for dim, labels in value.items():
        _check(labels, f"{where}.{dim}", "list")
        for i, label in enumerate(labels):
            if not isinstance(label, _SCALAR):
                _fail(f"{where}.{dim}[{i}]", "text or a number", label)


def _member_map(value, where: str) -> None:
    _check(value, where, "object")
    for key, member in value.items():
        _check(member, f"{where}.{key}", "text")


def _result_common(r: dict, where: str) -> None:
    for key in ("name", "kind"):
        _opt(r, key, f"{where}.{key}", "text")
    status = _opt(r, "status", f"{where}.status", "text")
    if status is not None and status not in STATUSES:
        _fail(f"{where}.status", "one of " + ", ".join(STATUSES), status)
    _opt(r, "message", f"{where}.message", "text")
    if r.get("dims") is not None:
        _str_list(r["dims"], f"{where}.dims")
    if r.get("labels") is not None:
        _labels(r["labels"], f"{where}.labels")
    for key in ("clean_metric", "corrupted_metric", "elapsed_s"):
        _opt(r, key, f"{where}.{key}", "number")
    _opt(r, "params", f"{where}.params", "object")


def _result_2(r: dict, where: str) -> None:
    _check(r, where, "object")
    _result_common(r, where)
    for key in ("name", "kind"):
        _opt(r, key, f"{where}.{key}", "text", required=True)
    _opt(r, "dims", f"{where}.dims", "list", required=True)
    arrays = _opt(r, "arrays", f"{where}.arrays", "object", required=True)
    _member_map(arrays, f"{where}.arrays")
    for key in ("values", "tokens_clean", "tokens_corrupted"):
        _opt(arrays, key, f"{where}.arrays.{key}", "text", required=True)
    if r.get("extras") is not None:
        _member_map(r["extras"], f"{where}.extras")
    if r.get("shape") is not None:
        _check(r["shape"], f"{where}.shape", "list")
        for i, n in enumerate(r["shape"]):
            _check(n, f"{where}.shape[{i}]", "whole number")


def _tokens(value, where: str) -> None:
    _check(value, where, "list")
    for i, t in enumerate(value):
        if not (isinstance(t, int) and not isinstance(t, bool)) or not -2**63 <= t < 2**63:
            _fail(f"{where}[{i}]", "a token id (a whole number)", t)


def _result_1(r: dict, where: str) -> None:
    _check(r, where, "object")
    _result_common(r, where)
    _opt(r, "values", f"{where}.values", "text", required=True)
    _opt(r, "dims", f"{where}.dims", "list", required=True)
    for key in ("tokens_clean", "tokens_corrupted"):
        if r.get(key) is not None:
            _tokens(r[key], f"{where}.{key}")


def check_project_doc(doc: Any, version: int) -> None:
    """Raise BoundedReadError naming the first field of project.json whose type is wrong."""
    _check(doc, "project.json", "object")
    _opt(doc, "model", "model", "object")
    if "prompts" not in doc:
        raise BoundedReadError("it lacks the field prompts")
    analyses = _opt(doc, "analyses", "analyses", "list") or []
    for i, item in enumerate(analyses):
        where = f"analyses[{i}]"
        _check(item, where, "object")
        if version >= 2:
            _opt(item, "spec", f"{where}.spec", "object", required=True)
            _opt(item, "result_spec", f"{where}.result_spec", "object")
            if item.get("result") is not None:
                _result_2(item["result"], f"{where}.result")
        else:
            if item.get("result") is not None:
                _result_1(item["result"], f"{where}.result")
    _opt(doc, "view_state" if version >= 2 else "view", "view_state" if version >= 2 else "view", "object")
    if version < 2:
        _opt(doc, "config_hash", "config_hash", "text")


def check_array_kinds(where: str, values, tokens_clean, tokens_corrupted) -> None:
    """Result arrays must hold numbers (values) and integer token ids (tokens)."""
    if values.dtype.kind not in "biufc":
        raise BoundedReadError(f"{where} holds values of type {values.dtype}, not numbers")
    for name, arr in (("tokens_clean", tokens_clean), ("tokens_corrupted", tokens_corrupted)):
        if arr.size and arr.dtype.kind not in "iu":
            raise BoundedReadError(f"{where} holds {name} of type {arr.dtype}, not token ids")

