"""Atomic file replacement: a crash or a full disk never leaves a half-written file where a good one was."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

from desktop_app.engine.errors import ProjectFileError


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC or err.errno == getattr(errno, "EDQUOT", -1):
        return "the disk is full; free some space or choose another folder"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; choose a folder you can write to"
    if err.errno == errno.ENOENT:
        return "the folder does not exist; choose an existing folder"
    return f"{err.strerror or err}; choose another folder or file name"


def _open_tmp(tmp: Path) -> BinaryIO:
    return open(tmp, "wb")


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); Windows cannot open a folder for fsync, and needs not."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _keep_backup(path: Path, bak: Path) -> None:
    """Make `bak` a copy of `path` while `path` itself stays in place the whole time."""
    staging = bak.with_name(bak.name + ".tmp")
    try:
        if staging.exists():
            staging.unlink()
        os.link(path, staging)  # cheap and instant where the filesystem has hard links
    except OSError:
        shutil.copyfile(path, staging)
    os.replace(staging, bak)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, backup: bool = False,
                 what: str = "file") -> Path:
    """Write `path` through write(fileobj) into `<path>.tmp`, fsync it, keep the old file as `<path>.bak`
    (if backup), then rename over `path`. On any failure the old file is untouched and ProjectFileError
    is raised; exceptions other than OSError from write() propagate after the temporary file is removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise ProjectFileError(f"cannot save {what} {path}: the folder {folder} does not exist; "
                               f"choose an existing folder.")
    if path.is_dir():
        raise ProjectFileError(f"cannot save {what} {path}: a folder has that name; choose another file name.")
    tmp = path.with_name(path.name + ".tmp")
    try:
        f = _open_tmp(tmp)
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        if backup and path.exists():
            _keep_backup(path, path.with_name(path.name + ".bak"))
        os.replace(tmp, path)
        _fsync_folder(folder)
    except OSError as e:
        _remove_quietly(tmp)
        raise ProjectFileError(f"could not save {what} {path}: {_reason(e)} "
                               f"(any previous file there is unchanged).", details=str(e)) from e
    except BaseException:
        _remove_quietly(tmp)
        raise
    return path


def _remove_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
