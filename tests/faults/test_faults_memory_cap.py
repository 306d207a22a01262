"""Zip bombs, huge declared shapes and oversized JSON, opened by a process whose address space is capped
(RLIMIT_AS) a little above what it already uses: each is refused with the documented one-sentence error,
before anything big is allocated (a MemoryError or a kill would mean the check came too late)."""
from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from faults_kit import PYTHON, ROOT, child_env
from iwb_testkit import make_project

from desktop_app.project.iwb import save_project

resource = pytest.importorskip("resource")
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS is enforced on Linux")

HEADROOM = 48 * 2**20  # every bomb below asks for more than this

CHILD = """
import json, resource, sys, traceback
from desktop_app.engine.errors import WorkbenchError
from desktop_app.project.experiment import load_experiment
from desktop_app.project.iwb import load_project
loaders = {"project": load_project, "experiment": load_experiment}
from desktop_app.engine.bounded_io import BoundedReadError, check_npz
loaders["npz"] = check_npz  # what load_sae runs on a params.npz before numpy reads it
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + int(sys.argv[2]), vm + int(sys.argv[2])))
for line in sys.stdin:
    kind, path = line.rstrip("\\n").split(" ", 1)
    try:
        loaders[kind](path)
        out = {"path": path, "outcome": "opened"}
    except (WorkbenchError, BoundedReadError) as err:
        out = {"path": path, "outcome": type(err).__name__, "message": str(err)}
    except BaseException as err:
        out = {"path": path, "outcome": "crash", "message": repr(err)[:300], "tb": traceback.format_exc()[-800:]}
    print(json.dumps(out), flush=True)
"""


def _run(kind: str, cases: list[tuple[str, object]]) -> dict[str, dict]:
    stdin = "".join(f"{k} {p}\n" for k, p in cases)
    proc = subprocess.run([PYTHON, "-c", CHILD, kind, str(HEADROOM)], cwd=ROOT, env=child_env(), input=stdin,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(cases), proc.stderr[-2000:]
    return {r["path"]: r for r in results}


def _bomb_archive(base: bytes, member: str, size: int) -> bytes:
    """The valid project with `member` replaced by `size` deflated zero bytes behind a valid .npy header."""
    header = {"descr": "<f4", "fortran_order": False, "shape": ((size - 128) // 4,)}
    text = repr(header).encode()
    text += b" " * (128 - 10 - len(text) - 1) + b"\n"
    npy_head = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            if info.filename == member:
                continue
            dst.writestr(info.filename, src.read(info))
        # write the bomb member through zipfile's own streaming writer, chunk by chunk
        zi = zipfile.ZipInfo(member)
        zi.compress_type = zipfile.ZIP_DEFLATED
        with dst.open(zi, "w", force_zip64=True) as m:
            m.write(npy_head)
            zeros = bytes(8 << 20)
            for _ in range((size - 128) // len(zeros)):
                m.write(zeros)
    return out.getvalue()


def _overlapping_archive(base: bytes) -> bytes:
    """Two central-directory entries pointing at the same local data: the 'overlapping files' bomb."""
    data = bytearray(base)
    with zipfile.ZipFile(io.BytesIO(base)) as zf:
        infos = zf.infolist()
    cd_sig = b"PK\x01\x02"
    first = data.find(cd_sig)
    second = data.find(cd_sig, first + 4)
    offset_of_first = infos[0].header_offset
    struct.pack_into("<I", data, second + 42, offset_of_first)
    return bytes(data)


def _lying_size_archive(base: bytes, member: str) -> bytes:
    """A member whose directory says 1 KiB but whose data inflates to 64 MiB."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, bytes(64 << 20) if info.filename == member else src.read(info))
    data = bytearray(out.getvalue())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        names = [i.filename for i in zf.infolist()]
    pos = -1
    for name in names:
        pos = data.find(b"PK\x01\x02", pos + 1)
        if name == member:
            struct.pack_into("<I", data, pos + 24, 1024)  # uncompressed size in the central directory
            local = struct.unpack_from("<I", data, pos + 42)[0]
            struct.pack_into("<I", data, local + 22, 1024)  # and in the local header
    return bytes(data)


def _huge_shape_archive(base: bytes, member: str) -> bytes:
    header = repr({"descr": "<f8", "fortran_order": False, "shape": (10**6, 10**6)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    npy = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(64)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, npy if info.filename == member else src.read(info))
    return out.getvalue()


def _json_bomb_archive(base: bytes) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base)) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename == "project.json":
                doc = json.loads(src.read(info))
                doc["view_state"]["padding"] = " " * (64 << 20)
                dst.writestr(info.filename, json.dumps(doc))
            else:
                dst.writestr(info, src.read(info))
    return out.getvalue()


def test_bombs_and_huge_shapes_are_refused_under_a_memory_cap(tmp_path):
    valid = tmp_path / "valid.iwb"
    save_project(make_project(), valid)
    base = valid.read_bytes()
    with zipfile.ZipFile(valid) as zf:
        member = json.loads(zf.read("project.json"))["analyses"][0]["result"]["arrays"]["values"]
    files = {
        "deflate_bomb.iwb": _bomb_archive(base, member, 96 << 20),
        "overlapping.iwb": _overlapping_archive(base),
        "lying_size.iwb": _lying_size_archive(base, member),
        "huge_shape.iwb": _huge_shape_archive(base, member),
        "json_bomb.iwb": _json_bomb_archive(base),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    sparse = tmp_path / "sparse_huge.iwb"
    with open(sparse, "wb") as f:
        f.truncate(8 * 2**30)  # 8 GiB of nothing: sparse, costs no disk
    exp_sparse = tmp_path / "sparse_huge.json"
    with open(exp_sparse, "wb") as f:
        f.truncate(2 * 2**30)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    digits = tmp_path / "digits.json"
    digits.write_text('{"version": ' + "9" * 1_000_000 + "}")

    cases = [("project", valid)] + [("project", tmp_path / n) for n in files] + [("project", sparse)] + \
        [("experiment", p) for p in (exp_sparse, deep, digits)]
    results = _run("project", cases)
    assert results[str(valid)]["outcome"] == "opened", results[str(valid)]  # the cap leaves room for real work
    refused = {p.name: results[str(p)] for _, p in cases[1:]}
    for name, r in refused.items():
        expected = "SpecError" if name.endswith(".json") else "ProjectFileError"
        assert r["outcome"] == expected, (name, r)
        assert "\n" not in r["message"] and r["message"].endswith("."), r
    assert "zip bomb" in refused["deflate_bomb.iwb"]["message"]
    assert "overlap" in refused["overlapping.iwb"]["message"]
    assert "(1000000, 1000000)" in refused["huge_shape.iwb"]["message"]
    assert "levels deep" in refused["deep.json"]["message"]
    assert "digits" in refused["digits.json"]["message"]


def test_sae_npz_with_a_huge_declared_shape_is_refused_under_a_memory_cap(tmp_path):
    npz = tmp_path / "params.npz"
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (10**6, 10**6)}).encode()
    header += b" " * (-(len(header) + 11) % 64) + b"\n"
    with zipfile.ZipFile(npz, "w") as zf:
        zf.writestr("W_enc.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(64))
        for name in ("W_dec", "b_enc", "b_dec"):
            buf = io.BytesIO()
            np.save(buf, np.zeros(4, dtype=np.float32))
            zf.writestr(f"{name}.npy", buf.getvalue())
    r = _run("npz", [("npz", npz)])[str(npz)]
    assert r["outcome"] == "BoundedReadError", r
    assert "(1000000, 1000000)" in r["message"]
    from desktop_app.engine.errors import SAEError
    from desktop_app.engine.sae.formats import load_sae

    with pytest.raises(SAEError, match=r"\(1000000, 1000000\)") as err:
        load_sae(npz, hook_name="blocks.0.hook_resid_post")
    assert "\n" not in str(err.value) and str(err.value).endswith(".")
