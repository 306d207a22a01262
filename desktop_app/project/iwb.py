"""Project files (.iwb): a zip holding project.json and one .npy member per array. See docs/file-format.md.

Reading is defensive: a file is refused (ProjectFileError) when it is not a complete zip, comes from a newer
schema, has member names that could escape a folder, holds anything that is not project.json or a plain
.npy array (no pickles, no object arrays), or lacks a member that project.json names. One loader per schema
version turns a file of that version into a Project; older versions are migrated on open.
"""
from __future__ import annotations

import io
import json
import math
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Callable

import numpy as np

from desktop_app import __version__
from desktop_app.engine.errors import ProjectFileError, WorkbenchError
from desktop_app.engine.results import AnalysisResult
from desktop_app.engine import bounded_io
from desktop_app.project import doc_checks
from desktop_app.project.atomic import atomic_write
from desktop_app.project.text_safety import encode_json_document
from desktop_app.project.document import AnalysisEntry, Project, model_fingerprint
from desktop_app.project.dataset_prompts import prompts_from_json
from desktop_app.project.specs import ModelRef, analysis_from_dict

SCHEMA_VERSION = 2
FORMAT_NAME = "interp-workbench-project"
PROJECT_JSON = "project.json"
_NPY_MAGIC = b"\x93NUMPY"
_ALLOWED_KINDS = "biufcUS"  # bool, ints, floats, complex, unicode and byte strings: never objects
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


# ---- plain JSON helpers ----------------------------------------------------------------------------------

def jsonable(obj: Any) -> Any:
    """Numpy scalars/arrays and tuples to plain JSON values; NaN and infinities to None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _metric_out(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _metric_in(x) -> float:
    return float("nan") if x is None else float(x)


# ---- saving ----------------------------------------------------------------------------------------------

def _put_array(zf: zipfile.ZipFile, member: str, arr: np.ndarray, where: str) -> str:
    arr = np.asarray(arr)
    if arr.dtype.kind not in _ALLOWED_KINDS:
        raise ProjectFileError(f"{where} holds an array of {arr.dtype} values, which a project file cannot "
                               f"store; convert it to numbers or strings.")
    with zf.open(member, "w", force_zip64=True) as m:
        np.save(m, arr, allow_pickle=False)
    return member


def _result_to_json(zf: zipfile.ZipFile, i: int, r: AnalysisResult) -> dict[str, Any]:
    where = f"the result of analysis {r.name!r}"
    base = f"analyses/{i}"
    arrays = {"values": _put_array(zf, f"{base}/values.npy", r.values, where),
              "tokens_clean": _put_array(zf, f"{base}/tokens_clean.npy", r.tokens_clean, where),
              "tokens_corrupted": _put_array(zf, f"{base}/tokens_corrupted.npy", r.tokens_corrupted, where)}
    extras = {name: _put_array(zf, f"{base}/extra_{j}.npy", arr, where)
              for j, (name, arr) in enumerate(r.extras.items())}
    return {"name": r.name, "kind": r.kind, "params": jsonable(r.params), "status": r.status,
            "message": r.message, "dims": list(r.dims), "shape": list(r.values.shape),
            "labels": jsonable({d: list(r.labels.get(d, [])) for d in r.labels}),
            "clean_metric": _metric_out(r.clean_metric), "corrupted_metric": _metric_out(r.corrupted_metric),
            "elapsed_s": float(r.elapsed_s), "arrays": arrays, "extras": extras}


def write_archive(project: Project, f: BinaryIO) -> None:
    """Write the whole .iwb zip for `project` into an open binary file."""
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        analyses = []
        for i, entry in enumerate(project.analyses):
            item: dict[str, Any] = {"spec": entry.spec.to_dict(), "result": None, "result_spec": None}
            if entry.result is not None:
                item["result"] = _result_to_json(zf, i, entry.result)
                if entry.result_spec is not None and entry.result_spec != entry.spec:
                    item["result_spec"] = entry.result_spec.to_dict()
                if entry.result_model is not None:
                    item["result_model"] = entry.result_model
            analyses.append(item)
        doc = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "app_version": __version__,
               "model": project.model.to_dict() if project.model else None,
               "prompts": project.prompts.to_dict(), "analyses": analyses,
               "view_state": project.view_state}
        zf.writestr(PROJECT_JSON, encode_json_document(doc, indent=1), compress_type=zipfile.ZIP_DEFLATED)


def _write_archive(project: Project, f: BinaryIO) -> None:
    write_archive(project, f)  # an indirection tests replace to simulate a full disk


def save_project(project: Project, path: str | Path, *, backup: bool = True, mark_saved: bool = True) -> Path:
    """Save atomically to `path` (keeping the previous file as `<path>.bak`); raises ProjectFileError."""
    path = Path(path)
    atomic_write(path, lambda f: _write_archive(project, f), backup=backup, what="project")
    if mark_saved:
        project.mark_saved(path)
    return path


# ---- loading: checks shared by every schema ---------------------------------------------------------------

class _Archive:
    """A zip opened for reading with every member name checked, and arrays read without pickle."""

    def __init__(self, zf: zipfile.ZipFile, path: Path):
        self.zf, self.path = zf, path
        try:
            bounded_io.check_zip_directory(zf)
        except bounded_io.BoundedReadError as e:
            self.fail(str(e))
        names = zf.namelist()
        if len(set(names)) != len(names):
            self.fail("it names the same member twice")
        for name in names:
            parts = name.replace("\\", "/").split("/")
            if name.startswith(("/", "\\")) or "\\" in name or _DRIVE_RE.match(name) or ".." in parts:
                self.fail(f"its member {name!r} points outside the project folder")
            if name != PROJECT_JSON and not name.endswith("/"):
                self._check_member(name)
        self.names = set(names)

    def fail(self, why: str):
        raise ProjectFileError(f"cannot open project {self.path}: {why}; it was not written by "
                               f"Interp Workbench or was damaged, so open a backup copy.")

    def _check_member(self, name: str) -> None:
        if self.zf.getinfo(name).flag_bits & 0x1:  # zipfile raises a bare RuntimeError on an encrypted member
            self.fail(f"its member {name!r} is encrypted")
        with self.zf.open(name) as m:
            head = m.read(len(_NPY_MAGIC))
        if head[:1] == b"\x80" or name.endswith((".pkl", ".pickle", ".joblib")):
            self.fail(f"its member {name!r} is a Python pickle, which is never loaded")
        if head != _NPY_MAGIC or not name.endswith(".npy"):
            self.fail(f"its member {name!r} is not a .npy array")
        try:
            with self.zf.open(name) as m:
                bounded_io.read_npy_header(m, _ALLOWED_KINDS)
        except bounded_io.BoundedReadError as e:
            self.fail(f"its member {name!r}: {e}")

    def json(self, name: str = PROJECT_JSON) -> Any:
        if name not in self.names:
            self.fail(f"it has no {name}")
        try:
            return bounded_io.loads_json(bounded_io.read_member(self.zf, name, bounded_io.LIMITS.json_bytes))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            self.fail(f"its {name} {bounded_io.json_error_text(e)}")
        except bounded_io.BoundedReadError as e:
            self.fail(f"its {name}: {e}")

    def array(self, name: Any) -> np.ndarray:
        if not isinstance(name, str) or name not in self.names:
            self.fail(f"the array member {name!r} named in project.json is missing")
        try:
            return bounded_io.load_npy_member(self.zf, name, allowed_kinds=_ALLOWED_KINDS)
        except bounded_io.BoundedReadError as e:
            self.fail(str(e))


def _result(ar: _Archive, r: dict, values, tokens_clean, tokens_corrupted, extras, params) -> AnalysisResult:
    try:
        doc_checks.check_array_kinds(f"the result of {r.get('name')!r}", values, tokens_clean, tokens_corrupted)
    except bounded_io.BoundedReadError as e:
        ar.fail(str(e))
    try:
        return AnalysisResult(
            name=r["name"], kind=r["kind"], params=params, dims=list(r["dims"]), values=values,
            labels={str(k): list(v) for k, v in (r.get("labels") or {}).items()},
            status=r.get("status", "complete"), message=r.get("message", ""),
            tokens_clean=tokens_clean, tokens_corrupted=tokens_corrupted,
            clean_metric=_metric_in(r.get("clean_metric")), corrupted_metric=_metric_in(r.get("corrupted_metric")),
            elapsed_s=float(r.get("elapsed_s", 0.0)), extras=extras)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        ar.fail(f"a stored result is malformed ({type(e).__name__}: {e})")


# ---- one loader per schema version -------------------------------------------------------------------------

def _load_schema_2(ar: _Archive, doc: dict) -> Project:
    entries = []
    for item in doc.get("analyses", []):
        spec = analysis_from_dict(item["spec"])
        result, result_spec = None, None
        r = item.get("result")
        if r is not None:
            arrays = r["arrays"]
            extras = {str(k): ar.array(v) for k, v in (r.get("extras") or {}).items()}
            result = _result(ar, r, ar.array(arrays["values"]), ar.array(arrays["tokens_clean"]),
                             ar.array(arrays["tokens_corrupted"]), extras, r.get("params") or {})
            result_spec = analysis_from_dict(item["result_spec"]) if item.get("result_spec") else spec
        entries.append(AnalysisEntry(spec, result, result_spec, _result_model(item.get("result_model"))))
    model = ModelRef.from_dict(doc["model"]) if doc.get("model") else None
    for entry in entries:  # files written before results recorded their model: the project's model
        if entry.result is not None and entry.result_model is None:
            entry.result_model = model_fingerprint(model)
    return Project(model=model, prompts=prompts_from_json(doc["prompts"]), analyses=entries,
                   view_state=doc.get("view_state") or {})


def _result_model(d) -> dict | None:
    if d is None:
        return None
    if not isinstance(d, dict) or not all(isinstance(d.get(k, ""), str) for k in ("path", "config_hash", "quantize")):
        raise ValueError("result_model must be an object of texts path, config_hash, quantize")
    return {"path": d.get("path", ""), "config_hash": d.get("config_hash", ""), "quantize": d.get("quantize", "none")}


def _load_schema_1(ar: _Archive, doc: dict) -> Project:
    """Schema 1 (app 0.0.x): spec fields flat next to name/kind, `per_position` (bool) instead of
    `positions`, the config hash beside the model, tokens inline in JSON, arrays named by analysis name,
    and the view state under "view"."""
    entries = []
    for item in doc.get("analyses", []):
        item = dict(item)
        r = item.pop("result", None)
        if "per_position" in item:
            item["positions"] = "each" if item.pop("per_position") else "all"
        spec = analysis_from_dict(item)
        result = None
        if r is not None:
            params = {k: v for k, v in spec.to_dict().items() if k not in ("name", "kind")}
            r = {**r, "name": spec.name, "kind": spec.kind}
            result = _result(ar, r, ar.array(r.get("values")),
                             np.asarray(r.get("tokens_clean", []), dtype=np.int64),
                             np.asarray(r.get("tokens_corrupted", []), dtype=np.int64), {}, params)
        entries.append(AnalysisEntry(spec, result, spec if result is not None else None))
    model = None
    if doc.get("model"):
        model = ModelRef.from_dict({**doc["model"], "config_hash": doc.get("config_hash", "")})
    for entry in entries:
        if entry.result is not None:
            entry.result_model = model_fingerprint(model)
    return Project(model=model, prompts=prompts_from_json(doc["prompts"]), analyses=entries,
                   view_state=doc.get("view") or {})


LOADERS: dict[int, Callable[[_Archive, dict], Project]] = {1: _load_schema_1, 2: _load_schema_2}


def load_project(path: str | Path) -> Project:
    """Open a .iwb file of any known schema version; raises ProjectFileError with one sentence."""
    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as e:  # a name too long, a NUL byte
        raise ProjectFileError(f"cannot open project {path}: {getattr(e, 'strerror', None) or e}; check the "
                               f"path.") from None
    if not exists:
        raise ProjectFileError(f"project file {path} does not exist; check the path.")
    if is_dir:
        raise ProjectFileError(f"{path} is a folder, not a project file; choose a .iwb file.")
    try:
        with bounded_io.open_regular(path) as fh, zipfile.ZipFile(fh) as zf:
            ar = _Archive(zf, path)
            doc = ar.json()
            if not isinstance(doc, dict):
                ar.fail("its project.json is not a JSON object")
            version = doc.get("schema_version")
            if isinstance(version, bool) or not isinstance(version, int):
                ar.fail("its project.json has no schema_version")
            if version > SCHEMA_VERSION:
                raise ProjectFileError(
                    f"project {path} has schema version {version}, newer than the version {SCHEMA_VERSION} "
                    f"this Interp Workbench {__version__} reads; update the app to open it.")
            if version not in LOADERS:
                ar.fail(f"its schema version {version} is unknown")
            try:
                doc_checks.check_project_doc(doc, version)
            except bounded_io.BoundedReadError as e:
                ar.fail(str(e))
            try:
                project = LOADERS[version](ar, doc)
            except ProjectFileError:
                raise
            except WorkbenchError as e:
                ar.fail(f"it holds an invalid entry ({e})")
            except (KeyError, TypeError, ValueError, AttributeError) as e:
                ar.fail(f"its project.json is malformed ({type(e).__name__}: {e})")
    except (zipfile.BadZipFile, zlib.error, EOFError, zipfile.LargeZipFile, NotImplementedError) as e:
        raise ProjectFileError(f"cannot open project {path}: the file is truncated or is not a project file "
                               f"({e}); open its .bak copy if there is one.") from None
    except bounded_io.BoundedReadError as e:
        raise ProjectFileError(f"cannot open project {path}: {e}; choose a .iwb project file.") from None
    except (OSError, ValueError) as e:
        raise ProjectFileError(f"cannot read project {path}: {getattr(e, 'strerror', None) or e}; check the file "
                               f"and its permissions.") from None
    project.path = path
    project.mark_saved(path)
    return project
