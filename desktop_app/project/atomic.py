"""Atomic file replacement that a crash, a full disk, a symlink planted in the folder or a second writer
cannot turn into a destroyed file.

Every save writes its own uniquely named temporary file beside the target (created with O_EXCL, so it is
never a symlink or file that was already there), fsyncs it, keeps the previous file as `.bak` and renames
over the target. The backup and the rename happen under a lock on the folder (POSIX `flock`), and a save
whose target was replaced by another writer since the save began does not write over it: its own version
goes to a conflict file beside it, and the error says so. Killed at any moment, the folder holds the old or
the new file and a complete `.bak`, never half a file.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import BinaryIO, Callable

from desktop_app.engine.errors import ProjectFileError

TMP_PREFIX = ".iwb-save-"
_THREAD_LOCK = threading.Lock()  # flock already separates threads; this also covers platforms without it


class SaveConflict(ProjectFileError):
    """Another writer replaced the file while this save was writing; `kept_at` holds this save's version."""

    def __init__(self, message: str, kept_at: Path | None):
        super().__init__(message)
        self.kept_at = kept_at


def _reason(err: OSError) -> str:
    if err.errno == errno.ENOSPC or err.errno == getattr(errno, "EDQUOT", -1):
        return "the disk is full; free some space or choose another folder"
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; choose a folder you can write to"
    if err.errno == errno.ENOENT:
        return "the folder does not exist; choose an existing folder"
    if err.errno == errno.ENAMETOOLONG:
        return "the file name is longer than this file system allows; choose a shorter name"
    return f"{err.strerror or err}; choose another folder or file name"


def name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return 255


def _fit_name(name: str, suffix: str, limit: int) -> str:
    """`name + suffix`, with `name` shortened (on a UTF-8 character boundary) so the result fits `limit` bytes."""
    room = limit - len(suffix.encode("utf-8"))
    raw = name.encode("utf-8")
    if len(raw) <= room:
        return name + suffix
    return raw[:max(room, 1)].decode("utf-8", errors="ignore") + suffix


def backup_path(path: str | os.PathLike) -> Path:
    """Where the previous version of `path` is kept: `<name>.bak`, shortened when the name is at the limit."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    return path.with_name(_fit_name(path.name, ".bak", name_max(folder)))


def conflict_path(path: Path) -> Path:
    """A new, unused name beside `path` for a version that lost a race: `<stem>.conflict-<time>-<random><ext>`."""
    folder = path.parent if str(path.parent) else Path(".")
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
    return path.with_name(_fit_name(path.stem, f".conflict-{stamp}{path.suffix}", name_max(folder)))


def _open_tmp(target: Path) -> tuple[BinaryIO, Path]:
    """A new temporary file in the target's folder, created with O_EXCL: never an existing file or symlink."""
    folder = target.parent if str(target.parent) else Path(".")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        tmp = folder / f"{TMP_PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), tmp
    raise FileExistsError(errno.EEXIST, "could not create a unique temporary file", str(folder))


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


@contextlib.contextmanager
def _folder_lock(folder: Path):
    """Serialise the backup-and-rename step of every writer (threads and processes) in one folder."""
    with _THREAD_LOCK:
        fd = None
        try:
            import fcntl
            fd = os.open(folder, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if fd is not None:
                os.close(fd)
            fd = None
        try:
            yield
        finally:
            if fd is not None:
                os.close(fd)  # closing releases the flock


def _identity(path: Path):
    """What changes when another writer replaces `path` (inode, size, mtime); None when there is no file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _keep_backup(path: Path, bak: Path) -> None:
    """Make `bak` a copy of `path` while `path` itself stays in place the whole time."""
    staging = bak.parent / f"{TMP_PREFIX}{secrets.token_hex(8)}.bak"
    try:
        os.link(path, staging, follow_symlinks=False)  # instant where the file system has hard links
    except OSError:
        if os.path.islink(path):
            return  # never copy through a symlink into this folder
        shutil.copyfile(path, staging)
    try:
        os.replace(staging, bak)
    except BaseException:
        _remove_quietly(staging)
        raise
    if os.path.lexists(staging):  # bak was already a hard link to this file: rename(2) then does nothing
        _remove_quietly(staging)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, backup: bool = False,
                 what: str = "file") -> Path:
    """Write `path` through write(fileobj) into a new temporary file beside it, fsync it, keep the old file
    as its backup_path (if backup), then rename over `path`.

    On any failure the old file is untouched and ProjectFileError is raised (SaveConflict when another
    writer saved the same file meanwhile: this version is then kept under a conflict name); exceptions other
    than OSError from write() propagate after the temporary file is removed."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if len(path.name.encode("utf-8", "surrogateescape")) > name_max(folder):
        raise ProjectFileError(f"cannot save {what} {path}: the file name is longer than the "
                               f"{name_max(folder)} bytes this file system allows; choose a shorter name.")
    if not folder.is_dir():
        raise ProjectFileError(f"cannot save {what} {path}: the folder {folder} does not exist; "
                               f"choose an existing folder.")
    if path.is_dir():
        raise ProjectFileError(f"cannot save {what} {path}: a folder has that name; choose another file name.")
    if os.path.lexists(path) and not (path.is_file() or os.path.islink(path)):
        raise ProjectFileError(f"cannot save {what} {path}: it is a device, pipe or socket, not a file; "
                               f"choose another file name.")
    before = _identity(path)
    tmp = None
    try:
        f, tmp = _open_tmp(path)
        try:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        with _folder_lock(folder):
            if _identity(path) != before:
                kept = conflict_path(path)
                os.replace(tmp, kept)
                tmp = None
                raise SaveConflict(
                    f"{path} was saved by another window or program while this {what} was being written, so "
                    f"it was not overwritten; this version is kept as {kept.name} beside it.", kept)
            if backup and before is not None:
                _keep_backup(path, backup_path(path))
            os.replace(tmp, path)
            tmp = None
        _fsync_folder(folder)
        _remove_stale_leftovers(folder)
    except SaveConflict:
        raise
    except OSError as e:
        if tmp is not None:
            _remove_quietly(tmp)
        raise ProjectFileError(f"could not save {what} {path}: {_reason(e)} "
                               f"(any previous file there is unchanged).", details=str(e)) from e
    except BaseException:
        if tmp is not None:
            _remove_quietly(tmp)
        raise
    return path


STALE_AFTER_S = 3600


def _remove_stale_leftovers(folder: Path) -> None:
    """Temporary files of saves that were killed (hours ago: a save in progress is never that old)."""
    now = time.time()
    try:
        for p in folder.glob(TMP_PREFIX + "*"):
            with contextlib.suppress(OSError):
                if now - p.lstat().st_mtime > STALE_AFTER_S:
                    p.unlink()
    except OSError:
        pass


def _remove_quietly(p: Path) -> None:
    try:
        p.unlink()
    except OSError:
        pass
