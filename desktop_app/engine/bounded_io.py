"""Reading files that someone else wrote, with limits: only regular files, sizes checked before reading,
zip members and `.npy` arrays checked against their declared sizes before anything is allocated, JSON
with bounded nesting and number sizes.

Every check raises `BoundedReadError(why)` with a short reason (no path); callers wrap it into their own
one-sentence error that names the file and the member or field.
"""
from __future__ import annotations

import io
import json
import math
import os
import stat
import zipfile
from dataclasses import dataclass
from typing import Any

import numpy as np

_NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class Limits:
    total_bytes: int = 8 * 2**30  # all members of one zip, uncompressed
    member_bytes: int = 4 * 2**30  # one member, uncompressed (one result array)
    json_bytes: int = 256 * 2**20  # one JSON document (project.json, an experiment file)
    members: int = 100_000
    json_depth: int = 64
    int_digits: int = 100  # longer integer literals are refused (Python would spend quadratic time on them)
    max_ratio: int = 200  # uncompressed / compressed size of a big compressed member (real arrays: under 10)
    ratio_from_bytes: int = 16 * 2**20  # the ratio is checked for members larger than this


LIMITS = Limits()


class BoundedReadError(ValueError):
    """A file or member exceeds a limit or is not what it claims; str() is the reason, without the path."""


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ---- regular files only ----------------------------------------------------------------------------------

def open_regular(path: str | os.PathLike, max_bytes: int | None = None):
    """Open `path` for binary reading only if it is a regular file (a FIFO, device or socket is refused
    without waiting on it); returns the open file. Raises BoundedReadError, or OSError when it cannot open."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO with no writer returns at once instead of hanging
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a pipe (FIFO)" if stat.S_ISFIFO(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise BoundedReadError(f"it is {kind}, not a regular file")
        if max_bytes is not None and st.st_size > max_bytes:
            raise BoundedReadError(f"it is {_size(st.st_size)}, more than the {_size(max_bytes)} allowed")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike, max_bytes: int) -> bytes:
    with open_regular(path, max_bytes) as f:
        expected = os.fstat(f.fileno()).st_size  # read(n) reserves n bytes at once: ask for what is there
        chunks, got = [], 0
        while got <= max_bytes:
            chunk = f.read(min(max(expected - got, 0) + 1, max_bytes + 1 - got, 1 << 24))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        data = b"".join(chunks)
    if len(data) > max_bytes:
        raise BoundedReadError(f"it grew past the {_size(max_bytes)} allowed while being read")
    return data


def is_regular_file(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


# ---- JSON ------------------------------------------------------------------------------------------------

def _parse_int(text: str) -> int:
    if len(text.lstrip("-")) > LIMITS.int_digits:
        raise BoundedReadError(f"it holds an integer with {len(text.lstrip('-'))} digits, more than the "
                               f"{LIMITS.int_digits} allowed")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BoundedReadError(f"it holds the number {text[:40]}, which is too large for a float")
    return value


def _parse_constant(name: str):
    raise BoundedReadError(f"it holds {name}, which is not valid JSON")


def _depth(obj: Any, limit: int) -> None:
    stack = [(obj, 1)]
    while stack:
        item, d = stack.pop()
        if d > limit:
            raise BoundedReadError(f"it nests lists and objects more than {limit} levels deep")
        if isinstance(item, dict):
            stack.extend((v, d + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, d + 1) for v in item)


def loads_json(text: str | bytes, max_depth: int | None = None) -> Any:
    """json.loads with limits: nesting depth, integer digits, finite floats, no NaN/Infinity literals.
    Raises BoundedReadError for a limit and json.JSONDecodeError / UnicodeDecodeError for bad syntax."""
    limit = max_depth or LIMITS.json_depth
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    if len(text) > LIMITS.json_bytes:
        raise BoundedReadError(f"it is {_size(len(text))} of JSON, more than the {_size(LIMITS.json_bytes)} allowed")
    try:
        data = json.loads(text, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except RecursionError:
        raise BoundedReadError(f"it nests lists and objects more than {limit} levels deep") from None
    _depth(data, limit)
    return data


def json_error_text(err: Exception) -> str:
    """The reason of a failed loads_json, as a phrase."""
    if isinstance(err, json.JSONDecodeError):
        return f"is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
    if isinstance(err, UnicodeDecodeError):
        return "is not UTF-8 text"
    return f"cannot be read: {err}"


# ---- zip archives ----------------------------------------------------------------------------------------

def check_zip_directory(zf: zipfile.ZipFile, limits: Limits = LIMITS) -> None:
    """Refuse a zip whose central directory declares too many members, too much data, or a deflate ratio
    only a zip bomb has, before any member is decompressed."""
    infos = zf.infolist()
    if len(infos) > limits.members:
        raise BoundedReadError(f"it has {len(infos)} members, more than the {limits.members} allowed")
    total = 0
    for info in infos:
        if info.file_size > limits.member_bytes:
            raise BoundedReadError(f"its member {info.filename!r} declares {_size(info.file_size)}, more than "
                                   f"the {_size(limits.member_bytes)} allowed per member")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > limits.ratio_from_bytes and \
                info.file_size > limits.max_ratio * max(info.compress_size, 1):
            ratio = info.file_size // max(info.compress_size, 1)
            raise BoundedReadError(f"its member {info.filename!r} expands {ratio} times when decompressed, which "
                                   f"only a zip bomb does")
        total += info.file_size
    spans = sorted((i.header_offset, i.header_offset + 30 + len(i.filename.encode("utf-8", "replace")) +
                    i.compress_size, i.filename) for i in infos)
    for (_, end, name), (start, _, other) in zip(spans, spans[1:]):
        if end > start:  # members sharing compressed data: the "overlapping files" zip bomb
            raise BoundedReadError(f"its members {name!r} and {other!r} overlap, which only a zip bomb does")
    if total > limits.total_bytes:
        raise BoundedReadError(f"its members declare {_size(total)} in all, more than the "
                               f"{_size(limits.total_bytes)} allowed")


def read_member(zf: zipfile.ZipFile, name: str, max_bytes: int | None = None) -> bytes:
    """A member's bytes, never more than its declared size (nor max_bytes): reading stops there."""
    info = zf.getinfo(name)
    cap = info.file_size if max_bytes is None else min(info.file_size, max_bytes)
    if info.file_size > cap:
        raise BoundedReadError(f"its member {name!r} is {_size(info.file_size)}, more than the {_size(cap)} allowed")
    out = io.BytesIO()
    with zf.open(info) as m:
        while True:
            chunk = m.read(min(1 << 20, cap + 1 - out.tell()))
            if not chunk:
                break
            out.write(chunk)
            if out.tell() > cap:
                raise BoundedReadError(f"its member {name!r} holds more data than its declared {_size(cap)}")
    return out.getvalue()


# ---- .npy headers ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NpyHeader:
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    data_bytes: int


def read_npy_header(fh, allowed_kinds: str = "biufcUS") -> NpyHeader:
    """Parse a .npy header from an open binary stream (which is left just after it); no data is read.
    Refuses object and structured dtypes and shapes whose size overflows."""
    magic = fh.read(len(_NPY_MAGIC))
    if magic != _NPY_MAGIC:
        raise BoundedReadError("it is not a .npy array")
    fh_version = fh.read(2)
    if len(fh_version) != 2 or tuple(fh_version) not in ((1, 0), (2, 0), (3, 0)):
        raise BoundedReadError(f"it uses a .npy format version {tuple(fh_version)} that is not supported")
    version = tuple(fh_version)
    try:
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh, max_header_size=10_000)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh, max_header_size=10_000)
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise BoundedReadError(f"it has a damaged .npy header ({str(e).splitlines()[0][:120]})") from None
    if dtype.hasobject or dtype.kind not in allowed_kinds or dtype.fields is not None:
        what = "Python objects (pickled)" if dtype.hasobject else f"{dtype} records" if dtype.fields else str(dtype)
        raise BoundedReadError(f"it is an array of {what}, which is never loaded")
    if len(shape) > 32 or any((not isinstance(d, int)) or d < 0 for d in shape):
        raise BoundedReadError(f"its .npy header declares an invalid shape {shape!r}")
    count = 1
    for d in shape:
        count *= d
    return NpyHeader(tuple(shape), dtype, bool(fortran), count * dtype.itemsize)


def load_npy_member(zf: zipfile.ZipFile, name: str, limits: Limits = LIMITS,
                    allowed_kinds: str = "biufcUS") -> np.ndarray:
    """Load one .npy member: the header is checked against the member's declared size and the limits first
    (a header declaring a huge shape is refused before any memory is allocated), then the data is read
    straight into the array, never past the declared size."""
    info = zf.getinfo(name)
    with zf.open(info) as m:
        header = read_npy_header(m, allowed_kinds)
        header_len = m.tell()
        if header.data_bytes > limits.member_bytes:
            raise BoundedReadError(f"its member {name!r} declares a {header.shape} array of "
                                   f"{_size(header.data_bytes)}, more than the {_size(limits.member_bytes)} allowed")
        if header_len + header.data_bytes != info.file_size:
            raise BoundedReadError(f"its member {name!r} declares a {header.shape} array of {header.dtype} "
                                   f"({_size(header.data_bytes)}) but holds "
                                   f"{_size(max(info.file_size - header_len, 0))} of data")
        count = header.data_bytes // header.dtype.itemsize if header.dtype.itemsize else 0
        try:
            flat = np.empty(count, dtype=header.dtype)
        except (MemoryError, ValueError):
            raise BoundedReadError(f"its member {name!r} holds a {header.shape} array of {_size(header.data_bytes)}, "
                                   f"which does not fit in the memory available") from None
        view = memoryview(flat).cast("B") if flat.size else memoryview(b"")
        filled = 0
        while filled < len(view):
            n = m.readinto(view[filled:filled + (1 << 22)])
            if not n:
                raise BoundedReadError(f"its member {name!r} ends before the {_size(header.data_bytes)} of data its "
                                       f"header declares")
            filled += n
    return flat.reshape(header.shape, order="F" if header.fortran_order else "C")


def check_npz(path: str | os.PathLike, limits: Limits = LIMITS, allowed_kinds: str = "biufc") -> None:
    """Check every member header of an .npz file (sizes, dtypes, shapes) before numpy loads it."""
    with open_regular(path) as fh, zipfile.ZipFile(fh) as zf:
        check_zip_directory(zf, limits)
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with zf.open(info) as m:
                header = read_npy_header(m, allowed_kinds)
                header_len = m.tell()
            if header.data_bytes > limits.member_bytes or header_len + header.data_bytes != info.file_size:
                raise BoundedReadError(f"its array {info.filename[:-4]!r} declares shape {header.shape} "
                                       f"({_size(header.data_bytes)}) but holds "
                                       f"{_size(max(info.file_size - header_len, 0))} of data")


__all__ = ["BoundedReadError", "LIMITS", "Limits", "NpyHeader", "check_npz", "check_zip_directory",
           "is_regular_file", "json_error_text", "load_npy_member", "loads_json", "open_regular", "read_member",
           "read_npy_header", "read_regular_bytes"]
