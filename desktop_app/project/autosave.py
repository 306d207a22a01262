"""Crash recovery: the window periodically writes the open project to a recovery file, removes it after a
normal save or close, and offers it back on the next start if it is still there.

The folder is platformdirs' user data dir by default; pass `folder=` or set INTERP_WORKBENCH_DATA_DIR
(tests do) to put it elsewhere.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from desktop_app.engine.errors import ProjectFileError
from desktop_app.project.atomic import TMP_PREFIX, atomic_write
from desktop_app.engine.bounded_io import is_regular_file, loads_json, read_regular_bytes
from desktop_app.project.document import Project
from desktop_app.project.iwb import load_project, save_project

APP_NAME = "interp-workbench"
RECOVERY_FILE = "recovery.iwb"
RECOVERY_META = "recovery.json"


def data_dir() -> Path:
    override = os.environ.get("INTERP_WORKBENCH_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs
    return Path(platformdirs.user_data_dir(APP_NAME, appauthor=False))


def recovery_dir(folder: str | os.PathLike | None = None) -> Path:
    return Path(folder) if folder is not None else data_dir() / "recovery"


@dataclass
class Recovery:
    path: Path  # the recovery .iwb
    original_path: Path | None  # where the project was last saved by the user, if ever
    saved_at: float  # time.time() of the autosave

    def load(self) -> Project:
        """The recovered project; it stays dirty and keeps the user's own path so Save goes back there."""
        project = load_project(self.path)
        project.path = self.original_path
        project.change_count += 1  # not saved to the user's file yet
        return project


def write_recovery(project: Project, folder: str | os.PathLike | None = None) -> Path:
    """Write the recovery copy of `project`; does not touch the project's dirty flag or its own file."""
    d = recovery_dir(folder)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ProjectFileError(f"cannot create the recovery folder {d} ({e.strerror}); "
                               f"check that it is writable.") from None
    path = save_project(project, d / RECOVERY_FILE, backup=False, mark_saved=False)
    meta = {"original_path": str(project.path) if project.path else None, "saved_at": time.time()}
    atomic_write(d / RECOVERY_META, lambda f: f.write(json.dumps(meta).encode("utf-8", "backslashreplace")),
                 what="recovery note")
    return path


def find_recovery(folder: str | os.PathLike | None = None) -> Recovery | None:
    """The recovery left by a session that did not end normally, or None. The note beside it goes through
    the same bounded reader as project files; a damaged note is ignored (the recovery file is what matters)."""
    d = recovery_dir(folder)
    path = d / RECOVERY_FILE
    if not is_regular_file(path):
        return None
    try:
        saved_at = path.stat().st_mtime
    except OSError:
        return None
    original = None
    try:
        meta = loads_json(read_regular_bytes(d / RECOVERY_META, 64 * 1024), max_depth=4)
    except (OSError, ValueError):  # missing, not a regular file, too big, not JSON (BoundedReadError is one)
        meta = None
    if isinstance(meta, dict):
        if isinstance(meta.get("original_path"), str) and meta["original_path"] and "\0" not in meta["original_path"]:
            original = Path(meta["original_path"])
        value = meta.get("saved_at")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < 1e11:
            saved_at = float(value)
    return Recovery(path, original, saved_at)


def _older_than(p: Path, seconds: float) -> bool:
    try:
        return time.time() - p.lstat().st_mtime > seconds
    except OSError:
        return False


def discard_recovery(folder: str | os.PathLike | None = None) -> None:
    d = recovery_dir(folder)
    # temporary files of autosaves that were killed; a recent one may belong to another window's autosave
    leftovers = [p.name for p in d.glob(TMP_PREFIX + "*") if _older_than(p, 3600)] if d.is_dir() else []
    for name in (RECOVERY_FILE, RECOVERY_META, RECOVERY_FILE + ".tmp", RECOVERY_META + ".tmp", *leftovers):
        try:
            (d / name).unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            raise ProjectFileError(f"cannot remove the recovery file {d / name} ({e.strerror}); "
                                   f"delete it by hand.") from None
