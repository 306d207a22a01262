"""The experiment file (JSON, contract section 2): model, prompts and a list of analyses to run."""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from desktop_app.engine.errors import SpecError
from desktop_app.engine.bounded_io import BoundedReadError, loads_json, read_regular_bytes
from desktop_app.project.specs import ANALYSIS_KINDS, AnalysisSpec, ModelRef, Prompts, analysis_from_dict

EXPERIMENT_VERSION = 1
EXPERIMENT_MAX_BYTES = 64 * 2**20
_TOP_LEVEL = ("version", "model", "prompts", "analyses")


@dataclass
class Experiment:
    model: ModelRef
    prompts: Prompts
    analyses: list[AnalysisSpec] = field(default_factory=list)
    version: int = EXPERIMENT_VERSION
    source: Path | None = None  # the file it was read from, if any

    def __post_init__(self):
        names = [a.name for a in self.analyses]
        for name in names:
            if names.count(name) > 1:
                raise SpecError(f"two analyses are named {name!r}; give each analysis its own name.")

    def analysis(self, name: str) -> AnalysisSpec:
        for spec in self.analyses:
            if spec.name == name:
                return spec
        raise SpecError(f"the experiment has no analysis named {name!r}; "
                        f"its analyses are {', '.join(a.name for a in self.analyses) or 'none'}.")

    def to_dict(self, relative_to: str | os.PathLike | None = None) -> dict[str, Any]:
        model = self.model.to_dict()
        if relative_to is not None and os.path.isabs(model["path"]):
            try:
                model["path"] = os.path.relpath(model["path"], relative_to)
            except ValueError:  # another drive on Windows: keep it absolute
                pass
        return {"version": self.version, "model": model, "prompts": self.prompts.to_dict(),
                "analyses": [a.to_dict() if relative_to is None else relative_spec_paths(a.to_dict(), relative_to)
                             for a in self.analyses]}

    def to_json(self, relative_to: str | os.PathLike | None = None) -> str:
        """JSON text; with relative_to (the folder the file will live in) the model path is written relative."""
        return json.dumps(self.to_dict(relative_to), indent=2, ensure_ascii=False) + "\n"


def parse_experiment(text: str, base_dir: str | os.PathLike | None = None, source: str = "the experiment",
                     progress=None) -> Experiment:
    """Parse experiment JSON text; relative model paths are resolved against base_dir when it is given.
    `progress(Progress)` follows the reading of a dataset file the prompts name."""
    try:
        data = loads_json(text)
    except json.JSONDecodeError as e:
        raise SpecError(f"{source} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}; "
                        f"fix the file there.") from None
    except BoundedReadError as e:
        raise SpecError(f"{source} cannot be used: {e}; write a plain experiment file.") from None
    if not isinstance(data, dict):
        raise SpecError(f"{source} must hold one JSON object with version, model, prompts and analyses.")
    unknown = sorted(set(data) - set(_TOP_LEVEL))
    if unknown:
        raise SpecError(f"{source} has an unknown top-level field '{unknown[0]}'; "
                        f"known fields are {', '.join(_TOP_LEVEL)}.")
    for key in _TOP_LEVEL:
        if key not in data:
            raise SpecError(f"{source} is missing the field '{key}'; add it.")
    version = data["version"]
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SpecError(f"{source}: field 'version' must be a whole number such as 1, not {version!r}.")
    if version > EXPERIMENT_VERSION:
        raise SpecError(f"{source} has version {version} but this Interp Workbench reads up to version "
                        f"{EXPERIMENT_VERSION}; update the app or write a version {EXPERIMENT_VERSION} file.")
    model = ModelRef.from_dict(data["model"])
    if base_dir is not None:
        p = os.path.expanduser(model.path)
        if not os.path.isabs(p):
            p = os.path.normpath(os.path.join(os.path.abspath(base_dir), p))
        model = ModelRef(**{**model.__dict__, "path": p})
    from desktop_app.project.dataset_prompts import prompts_from_json

    prompts = prompts_from_json(data["prompts"], base_dir, progress=progress)
    if not prompts.clean.strip():
        raise SpecError(f"{source}: field 'prompts.clean' is empty; write the clean prompt.")
    analyses = data["analyses"]
    if not isinstance(analyses, list):
        raise SpecError(f"{source}: field 'analyses' must be a list of analyses.")
    if base_dir is not None:
        analyses = [resolve_spec_paths(a, base_dir) for a in analyses]
    return Experiment(model=model, prompts=prompts, analyses=[analysis_from_dict(a) for a in analyses],
                      version=version)


def _path_fields(kind) -> list[dataclasses.Field]:
    from desktop_app.project import kinds

    kinds.load()
    cls = ANALYSIS_KINDS.get(kind) if isinstance(kind, str) else None
    return [f for f in dataclasses.fields(cls) if f.metadata.get("path")] if cls is not None else []


def _moved_path(value: str, move) -> str:
    p = os.path.expanduser(value)
    return value if not value.strip() else move(p)


def _map_spec_paths(d, move, names_file) -> Any:
    """A copy of an analysis's JSON form with `move` applied to every field marked path=True: a path field's
    text; a text list given as one string (a file); a text list of one entry that `names_file`."""
    if not isinstance(d, dict):
        return d
    out = dict(d)
    for f in _path_fields(d.get("kind")):
        value = out.get(f.name)
        if isinstance(value, str):
            out[f.name] = _moved_path(value, move)
        elif f.metadata["widget"] == "text_list" and isinstance(value, (list, tuple)) and len(value) == 1 \
                and isinstance(value[0], str) and names_file(value[0]):
            out[f.name] = [_moved_path(value[0], move)]
    return out


def _names_text_file(base_dir):
    from desktop_app.engine.text_data import TEXT_FILE_SUFFIXES

    def names_file(entry: str) -> bool:
        p = Path(os.path.expanduser(entry.strip()))
        return p.suffix.lower() in TEXT_FILE_SUFFIXES and (p if p.is_absolute() else Path(base_dir) / p).is_file()
    return names_file


def resolve_spec_paths(d, base_dir) -> Any:
    """Relative file paths of an analysis in an experiment file, resolved against the file's folder."""
    base = os.path.abspath(base_dir)

    def move(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))
    return _map_spec_paths(d, move, _names_text_file(base))


def relative_spec_paths(d, folder) -> Any:
    """An analysis's absolute file paths written relative to `folder` (the experiment file's folder)."""
    def move(p: str) -> str:
        if not os.path.isabs(p):
            return p
        try:
            return os.path.relpath(p, folder)
        except ValueError:  # another drive on Windows: keep it absolute
            return p
    return _map_spec_paths(d, move, _names_text_file(folder))


def load_experiment(path: str | os.PathLike, progress=None) -> Experiment:
    """The experiment file at `path`; `progress(Progress)` follows the reading of a dataset file it names."""
    path = Path(path)
    try:
        text = read_regular_bytes(path, EXPERIMENT_MAX_BYTES).decode("utf-8")
    except BoundedReadError as e:
        raise SpecError(f"experiment file {path} cannot be read: {e}; give the path of a .json file.") from None
    except FileNotFoundError:
        raise SpecError(f"experiment file {path} does not exist; check the path.") from None
    except IsADirectoryError:
        raise SpecError(f"{path} is a folder, not an experiment file; give the path of a .json file.") from None
    except UnicodeDecodeError:
        raise SpecError(f"experiment file {path} is not UTF-8 text; save it as UTF-8 JSON.") from None
    except (OSError, ValueError) as e:
        raise SpecError(f"experiment file {path} cannot be read ({getattr(e, 'strerror', None) or e}); check the "
                        f"path and its permissions.") from None
    exp = parse_experiment(text, base_dir=path.parent, source=f"experiment file {path}", progress=progress)
    exp.source = path
    return exp


def save_experiment(experiment: Experiment, path: str | os.PathLike) -> Path:
    """Write an experiment file that `interp-workbench run` executes unchanged (model path relative to it)."""
    from desktop_app.project.atomic import atomic_write

    path = Path(path)
    text = experiment.to_json(relative_to=path.parent.resolve() if path.parent.is_dir() else None)
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")), what="experiment file")
