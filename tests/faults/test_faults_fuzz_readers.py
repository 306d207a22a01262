"""Property-based fuzzing of the project and experiment readers: every input either opens or raises the
documented error type (ProjectFileError / SpecError) with one sentence; never another exception, a hang or
a traceback. What opens must also survive `info` and the CSV export. Examples are bounded and derandomized
so the run is fast and the same every time."""
from __future__ import annotations

import io
import json
import os
import zipfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from iwb_testkit import make_project

from desktop_app.cli import project_summary
from desktop_app.engine.errors import ProjectFileError, SpecError
from desktop_app.project.data_export import csv_text
from desktop_app.project.experiment import parse_experiment
from desktop_app.project.iwb import load_project, save_project

# IWB_FUZZ_EXAMPLES=5000 IWB_FUZZ_RANDOM=1 runs a long, randomized search by hand; the suite stays bounded.
FUZZ = settings(max_examples=int(os.environ.get("IWB_FUZZ_EXAMPLES", "120")),
                derandomize=not os.environ.get("IWB_FUZZ_RANDOM"), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


def _one_sentence(err: Exception) -> None:
    text = str(err)
    assert text and "\n" not in text and "Traceback" not in text, text
    assert text.rstrip().endswith("."), text


def _paths(obj, prefix=()):
    """Every location inside a JSON document, as a key path."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def _replace(doc, path, value):
    if not path:
        return value
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


def _delete(doc, path):
    if path:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return doc


def _valid_archive(tmp_path_factory) -> tuple[bytes, dict]:
    path = tmp_path_factory.mktemp("fuzz") / "valid.iwb"
    save_project(make_project(), path)
    data = path.read_bytes()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        doc = json.loads(zf.read("project.json"))
    return data, doc


def _rebuild(original: bytes, doc_bytes: bytes | None = None, extra: dict | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(original)) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = doc_bytes if info.filename == "project.json" and doc_bytes is not None else src.read(info)
            dst.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return out.getvalue()


def _opens_or_refuses(path) -> str:
    try:
        project = load_project(path)
    except ProjectFileError as err:
        _one_sentence(err)
        return "refused"
    json.dumps(project_summary(project))  # what `info` prints
    for entry in project.analyses:
        if entry.result is not None and entry.result.values.size < 10_000:
            csv_text(entry.result)  # what `export --format csv` writes
    return "opened"


_BASE: dict = {}


def _base(tmp_path_factory):
    if not _BASE:
        _BASE["data"], _BASE["doc"] = _valid_archive(tmp_path_factory)
        _BASE["paths"] = list(_paths(_BASE["doc"]))
    return _BASE


@FUZZ
@given(data=st.data())
def test_project_json_with_any_field_replaced(tmp_path_factory, data):
    base = _base(tmp_path_factory)
    doc = json.loads(json.dumps(base["doc"]))
    where = data.draw(st.sampled_from(base["paths"]))
    if data.draw(st.booleans()) and where:
        doc = _delete(doc, where)
    else:
        doc = _replace(doc, where, data.draw(json_values))
    path = tmp_path_factory.mktemp("f") / "p.iwb"
    path.write_bytes(_rebuild(base["data"], json.dumps(doc).encode()))
    _opens_or_refuses(path)


@FUZZ
@given(data=st.data())
def test_project_bytes_flipped_truncated_or_extended(tmp_path_factory, data):
    raw = bytearray(_base(tmp_path_factory)["data"])
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    if cut is not None:
        raw = raw[:cut]
    raw += data.draw(st.binary(max_size=16))
    path = tmp_path_factory.mktemp("f") / "p.iwb"
    path.write_bytes(bytes(raw))
    _opens_or_refuses(path)


npy_headers = st.builds(
    lambda descr, shape, fortran: {"descr": descr, "fortran_order": fortran, "shape": shape},
    st.sampled_from(["<f4", "<i8", "|O", "<U3", "|b1", "[('a', '<f4')]", "<c8", "|V4", ">f8"]),
    st.lists(st.integers(0, 2**62), max_size=4).map(tuple) | st.just((10**12, 10**12)),
    st.booleans())


@FUZZ
@given(header=npy_headers, payload=st.binary(max_size=64))
def test_npy_member_with_any_header(tmp_path_factory, header, payload):
    """A result array whose .npy header declares any dtype and shape, with data that may not match."""
    base = _base(tmp_path_factory)
    text = repr(header).encode("latin1")
    text += b" " * (-(len(text) + 11) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text + payload
    name = base["doc"]["analyses"][0]["result"]["arrays"]["values"]
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(base["data"])) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, member if info.filename == name else src.read(info))
    path = tmp_path_factory.mktemp("f") / "p.iwb"
    path.write_bytes(out.getvalue())
    _opens_or_refuses(path)


VALID_EXPERIMENT = {
    "version": 1, "model": {"path": "models/m", "dtype": "float32", "device": "cpu"},
    "prompts": {"clean": "When Mary and John", "corrupted": "When John and Mary", "answer": " Mary",
                "wrong_answer": " John"},
    "analyses": [{"name": "resid", "kind": "activation_patching", "component": "resid_pre"},
                 {"name": "trace", "kind": "causal_tracing", "subject": "Mary", "samples": 3},
                 {"name": "abl", "kind": "ablation", "component": "head_out", "layers": [0, 1]},
                 {"name": "feat", "kind": "sae_features", "sae": "saes/x", "top_k": 5}],
}


def _parses_or_refuses(text: str) -> None:
    try:
        parse_experiment(text, base_dir="/tmp", source="experiment file e.json")
    except SpecError as err:
        _one_sentence(err)


@FUZZ
@given(data=st.data())
def test_experiment_with_any_field_replaced(data):
    doc = json.loads(json.dumps(VALID_EXPERIMENT))
    where = data.draw(st.sampled_from(list(_paths(doc))))
    if data.draw(st.booleans()) and where:
        doc = _delete(doc, where)
    else:
        doc = _replace(doc, where, data.draw(json_values))
    _parses_or_refuses(json.dumps(doc))


@FUZZ
@given(text=st.text(max_size=200) | st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 100_000))
       | st.builds(lambda n: '{"version": ' + "9" * n + "}", st.integers(1, 50_000)))
def test_experiment_from_any_text(text):
    _parses_or_refuses(text)


def test_fuzzing_reaches_both_outcomes(tmp_path_factory):
    """The fuzzed readers are not refusing everything: an untouched file opens, a damaged one is refused."""
    base = _base(tmp_path_factory)
    path = tmp_path_factory.mktemp("f") / "p.iwb"
    path.write_bytes(base["data"])
    assert _opens_or_refuses(path) == "opened"
    path.write_bytes(base["data"][:100])
    assert _opens_or_refuses(path) == "refused"
    np.testing.assert_equal(parse_experiment(json.dumps(VALID_EXPERIMENT)).version, 1)


def _model_files(folder):
    """A small safetensors file, GGUF file and PyTorch .bin to damage."""
    import gguf
    import torch
    from safetensors.numpy import save_file

    folder.mkdir(exist_ok=True)
    save_file({"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones(5, dtype=np.int64)},
              str(folder / "w.safetensors"), metadata={"format": "pt"})
    w = gguf.GGUFWriter(str(folder / "m.gguf"), "llama")
    w.add_block_count(1)
    w.add_string("general.name", "fuzz")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_tensor("t0", np.arange(16, dtype=np.float32))
    w.add_tensor("t1", np.ones((2, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    torch.save({"w": torch.zeros(3)}, folder / "pytorch_model.bin")
    return {name: (folder / name).read_bytes() for name in ("w.safetensors", "m.gguf", "pytorch_model.bin")}


_MODEL_FILES: dict = {}


@settings(FUZZ, max_examples=min(FUZZ.max_examples, 60) if not os.environ.get("IWB_FUZZ_EXAMPLES") else
          FUZZ.max_examples)
@given(data=st.data())
def test_model_file_checks_never_raise(tmp_path_factory, data):
    """Damaged weights and GGUF files: every check answers None (consistent) or a phrase, never an exception."""
    import pytest

    pytest.importorskip("gguf")
    from desktop_app.engine.file_checks import gguf_problem, pytorch_bin_problem, safetensors_problem

    if not _MODEL_FILES:
        _MODEL_FILES.update(_model_files(tmp_path_factory.mktemp("model_files")))
    name = data.draw(st.sampled_from(sorted(_MODEL_FILES)))
    raw = bytearray(_MODEL_FILES[name])
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(raw))))
    path = tmp_path_factory.mktemp("f") / name
    path.write_bytes(bytes(raw[:cut] if cut is not None else raw))
    check = {"w.safetensors": safetensors_problem, "m.gguf": gguf_problem, "pytorch_model.bin": pytorch_bin_problem}
    answer = check[name](path)
    assert answer is None or (isinstance(answer, str) and "\n" not in answer)
    if cut is not None and cut < len(_MODEL_FILES[name]) // 2 and name != "pytorch_model.bin":
        assert answer is not None  # half a file is never consistent
