"""Output files of the command line and the window: refuse an output that is also an input, check before
hours of computing that the output can be written, and never lose results when the final save fails.
"""
from __future__ import annotations

import os
import secrets
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterable

from desktop_app.engine.errors import ProjectFileError, WorkbenchError
from desktop_app.project.atomic import TMP_PREFIX, SaveConflict, name_max


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):  # follows symlinks; catches hard links, ./x vs /abs/x, case-folding file systems
            return True
    except (OSError, ValueError):
        pass
    try:
        return os.path.realpath(a) == os.path.realpath(b)
    except (OSError, ValueError):
        return False


def refuse_output_that_is_input(out: str | os.PathLike, inputs: Iterable[tuple[str | os.PathLike, str]]) -> None:
    """Raise ProjectFileError when `out` is, or resolves to (symlink, hard link, relative path), one of
    `inputs` — pairs (path, what it is, e.g. "the experiment file")."""
    out = Path(out)
    for path, what in inputs:
        if path is None:
            continue
        if _same_file(out, Path(path)):
            raise ProjectFileError(f"the output {out} is {what} ({path}); writing it would destroy the input, so "
                                   f"choose another --out file.")


def check_writable(out: str | os.PathLike, what: str = "output") -> None:
    """Create and delete a probe file beside `out`, so a run stops at once when its output cannot be written
    (missing or read-only folder, a name too long, a folder or a pipe where the file should be)."""
    out = Path(out)
    folder = out.parent if str(out.parent) else Path(".")
    limit = name_max(folder)
    if len(out.name.encode("utf-8", "surrogateescape")) > limit:
        raise ProjectFileError(f"cannot write {out}: the file name is longer than the {limit} bytes this file "
                               f"system allows; choose a shorter name.")
    if out.is_dir():
        raise ProjectFileError(f"{out} is a folder; give the name of the {what} to write, such as "
                               f"{out / 'result'}.")
    if not folder.is_dir():
        raise ProjectFileError(f"cannot write {out} because the folder {folder} does not exist; create it first.")
    if os.path.lexists(out) and not (out.is_file() or out.is_symlink()):
        raise ProjectFileError(f"cannot write {out}: it is a pipe, device or socket, not a file; choose another "
                               f"file name.")
    probe = folder / f"{TMP_PREFIX}probe-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            os.write(fd, b"\0")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ProjectFileError(f"cannot write {out}: the folder {folder} is not writable "
                               f"({e.strerror or e}); choose a folder you can write to.") from None


def recovery_folders() -> list[Path]:
    """Where results go when their own output cannot be written: the app's data folder, then the temp folder."""
    from desktop_app.project.autosave import data_dir

    folders = []
    try:
        folders.append(data_dir() / "recovered")
    except Exception:  # noqa: BLE001 - platformdirs failing must not stop the fallback
        pass
    folders.append(Path(tempfile.gettempdir()) / "interp-workbench-recovered")
    return folders


def save_project_or_recover(project, out: str | os.PathLike) -> tuple[Path, str | None, list[str]]:
    """Save `project` to `out`; if that fails for any reason, save it in a recovery folder instead.

    Returns (where it was saved, the reason `out` failed or None, notes such as escaped text).
    Raises ProjectFileError only when neither `out` nor any recovery folder could be written."""
    from desktop_app.project.iwb import save_project

    out = Path(out)
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            save_project(project, out)
            return out, None, _notes(caught)
        except SaveConflict as err:  # another program saved `out` meanwhile: ours is complete beside it
            return err.kept_at, str(err), _notes(caught)
        except Exception as err:  # noqa: BLE001 - any failure: the results must still reach the disk
            reason = str(err) if isinstance(err, WorkbenchError) else f"{type(err).__name__}: {err}"
        stem = out.stem or "results"
        for folder in recovery_folders():
            name = f"{stem[:80]}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.iwb"
            try:
                folder.mkdir(parents=True, exist_ok=True)
                path = save_project(project, folder / name, backup=False)
                return path, reason, _notes(caught)
            except Exception as err:  # noqa: BLE001
                notes.append(f"{folder}: {err}")
    raise ProjectFileError(f"could not save the results to {out} ({reason.rstrip('.')}) nor to a recovery "
                           f"folder ({'; '.join(notes)}); free some disk space and run again.")


def _notes(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
