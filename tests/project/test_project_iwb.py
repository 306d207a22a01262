import errno
import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest

from desktop_app.engine.errors import ProjectFileError
from desktop_app.project import atomic, iwb
from desktop_app.project.document import Project
from desktop_app.project.iwb import SCHEMA_VERSION, load_project, save_project
from desktop_app.project.specs import ActivationPatchingSpec, CausalTracingSpec, Prompts

from iwb_testkit import assert_projects_equal, make_project

FIXTURES = Path(__file__).with_name("fixtures")


def test_round_trip_of_every_object(project, tmp_path):
    project.replace_spec("resid", ActivationPatchingSpec("resid", metric="logit_diff"))  # result now stale
    path = save_project(project, tmp_path / "p.iwb")
    assert not project.dirty and project.path == path
    again = load_project(path)
    assert_projects_equal(project, again)
    assert again.entry("resid").stale and not again.entry("trace").stale
    assert not again.dirty and again.path == path


def test_empty_project_round_trips(tmp_path):
    p = Project()
    assert_projects_equal(p, load_project(save_project(p, tmp_path / "e.iwb")))


def test_file_is_readable_with_zipfile_json_numpy_only(project, tmp_path):
    path = save_project(project, tmp_path / "p.iwb")
    with zipfile.ZipFile(path) as zf:
        doc = json.loads(zf.read("project.json"))
        assert doc["schema_version"] == SCHEMA_VERSION == 2
        r = doc["analyses"][0]["result"]
        values = np.load(io.BytesIO(zf.read(r["arrays"]["values"])), allow_pickle=False)
    np.testing.assert_array_equal(values, project.entry("resid").result.values)
    assert r["corrupted_metric"] is None and r["clean_metric"] == 1.5  # NaN is written as null
    assert doc["model"]["config_hash"] == "deadbeef"


def test_schema_1_fixture_migrates():
    p = load_project(FIXTURES / "schema1.iwb")
    assert p.model.config_hash == "0123abcd" and p.model.dtype == "float32"
    assert p.prompts.answer == " Mary"
    resid = p.entry("resid")
    assert resid.spec == ActivationPatchingSpec("resid", positions="each", metric="logit_diff_recovered")
    r = resid.result
    assert r.status == "partial" and r.dims == ["layer", "position"] and r.shape == (3, 4)
    expected = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    expected[2, 3] = np.nan
    np.testing.assert_array_equal(r.values, expected)
    np.testing.assert_array_equal(r.tokens_corrupted, [5, 6, 7, 9])
    assert (r.clean_metric, r.corrupted_metric, r.elapsed_s) == (2.5, -1.25, 0.75)
    assert r.labels["position"][1] == "1:  Mary"
    assert p.entry("trace").spec == CausalTracingSpec("trace", subject="Mary", samples=4)
    assert p.entry("trace").result is None
    assert p.view_state["selected_hooks"] == ["blocks.0.hook_resid_pre"]


def test_migrated_project_saves_as_current_schema(tmp_path):
    p = load_project(FIXTURES / "schema1.iwb")
    again = load_project(save_project(p, tmp_path / "m.iwb"))
    assert_projects_equal(p, again)
    with zipfile.ZipFile(tmp_path / "m.iwb") as zf:
        assert json.loads(zf.read("project.json"))["schema_version"] == 2


# ---- bad input ----

def _rewrite(src: Path, dst: Path, edit_doc=None, extra: dict | None = None, drop=()):
    """Copy a .iwb zip, optionally editing project.json, adding members or dropping some."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            if name in drop:
                continue
            data = zin.read(name)
            if name == "project.json" and edit_doc:
                doc = json.loads(data)
                edit_doc(doc)
                data = json.dumps(doc).encode()
            zout.writestr(name, data)
        for name, data in (extra or {}).items():
            zout.writestr(name, data)
    return dst


@pytest.fixture
def saved(project, tmp_path):
    return save_project(project, tmp_path / "good.iwb")


@pytest.mark.parametrize("keep", [0.3, 0.6, 0.95])
def test_truncated_file_is_refused(saved, tmp_path, keep):
    data = saved.read_bytes()
    bad = tmp_path / "cut.iwb"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ProjectFileError, match="truncated"):
        load_project(bad)


def test_garbage_and_empty_files_are_refused(tmp_path):
    for i, data in enumerate([b"", b"hello world", b"PK\x03\x04" + b"\0" * 50]):
        p = tmp_path / f"g{i}.iwb"
        p.write_bytes(data)
        with pytest.raises(ProjectFileError):
            load_project(p)
    with pytest.raises(ProjectFileError, match="does not exist"):
        load_project(tmp_path / "nope.iwb")


def test_corrupted_member_bytes_are_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("analyses/0/values.npy")
    # Flip a byte inside the stored (uncompressed) array data: the CRC check must catch it.
    data[info.header_offset + 30 + len(info.filename) + info.file_size // 2 + 40] ^= 0xFF
    bad = tmp_path / "flip.iwb"
    bad.write_bytes(bytes(data))
    with pytest.raises(ProjectFileError):
        load_project(bad)


def test_newer_schema_is_refused_naming_both_versions(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "new.iwb", edit_doc=lambda d: d.update(schema_version=SCHEMA_VERSION + 5))
    with pytest.raises(ProjectFileError) as e:
        load_project(bad)
    assert str(SCHEMA_VERSION + 5) in str(e.value) and f"version {SCHEMA_VERSION}" in str(e.value)
    assert "newer" in str(e.value)


@pytest.mark.parametrize("name", ["/etc/evil.npy", "../evil.npy", "analyses/../../evil.npy",
                                  "C:/evil.npy", "analyses\\..\\evil.npy"])
def test_member_paths_escaping_the_folder_are_refused(saved, tmp_path, name):
    buf = io.BytesIO()
    np.save(buf, np.zeros(2))
    bad = tmp_path / "escape.iwb"
    shutil.copy(saved, bad)
    with zipfile.ZipFile(bad, "a") as zf:
        zi = zipfile.ZipInfo("placeholder")
        zi.filename = name  # ZipInfo would normalise some of these; write the raw name like an attacker
        zf.writestr(zi, buf.getvalue())
    with zipfile.ZipFile(bad) as zf:
        assert name in zf.namelist()
    with pytest.raises(ProjectFileError, match="outside"):
        load_project(bad)


def test_pickle_member_is_refused(saved, tmp_path):
    import pickle
    payload = pickle.dumps({"x": 1})
    for name in ["analyses/0/values.npy", "extra.pkl"]:
        drop = (name,) if name.endswith(".npy") else ()
        bad = _rewrite(saved, tmp_path / "pk.iwb", extra={name: payload}, drop=drop)
        with pytest.raises(ProjectFileError, match="pickle"):
            load_project(bad)


def test_object_array_member_is_refused(saved, tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    bad = _rewrite(saved, tmp_path / "obj.iwb", extra={"analyses/0/values.npy": buf.getvalue()},
                   drop=("analyses/0/values.npy",))
    with pytest.raises(ProjectFileError, match="objects"):
        load_project(bad)


def test_missing_member_is_refused(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "miss.iwb", drop=("analyses/0/tokens_clean.npy",))
    with pytest.raises(ProjectFileError, match="tokens_clean.npy"):
        load_project(bad)
    bad = _rewrite(saved, tmp_path / "nojson.iwb", drop=("project.json",))
    with pytest.raises(ProjectFileError, match="project.json"):
        load_project(bad)


def test_bad_json_and_bad_spec_inside_are_refused(saved, tmp_path):
    bad = tmp_path / "badjson.iwb"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("project.json", '{"schema_version": 2,\n "model": }')
    with pytest.raises(ProjectFileError, match="line 2, column"):
        load_project(bad)
    bad = _rewrite(saved, tmp_path / "badspec.iwb",
                   edit_doc=lambda d: d["analyses"][0]["spec"].update(kind="mystery"))
    with pytest.raises(ProjectFileError, match="mystery"):
        load_project(bad)


# ---- atomic save ----

def test_save_keeps_previous_version_as_bak(project, tmp_path):
    path = tmp_path / "p.iwb"
    save_project(project, path)
    project.set_prompts(Prompts("second version"))
    save_project(project, path)
    assert load_project(path).prompts.clean == "second version"
    assert load_project(tmp_path / "p.iwb.bak").prompts.clean == "When Mary and John"
    assert not (tmp_path / "p.iwb.tmp").exists()


def test_disk_full_leaves_old_file_intact(project, tmp_path, monkeypatch):
    path = save_project(project, tmp_path / "p.iwb")
    before = path.read_bytes()

    def full_disk(proj, f):
        f.write(b"PK\x03\x04 partial data")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(iwb, "_write_archive", full_disk)
    project.set_prompts(Prompts("never saved"))
    with pytest.raises(ProjectFileError, match="disk is full"):
        save_project(project, path)
    assert project.dirty
    assert path.read_bytes() == before
    assert load_project(path).prompts.clean == "When Mary and John"
    assert not (tmp_path / "p.iwb.tmp").exists()


def test_unwritable_folder_leaves_old_file_intact(project, tmp_path, monkeypatch):
    path = save_project(project, tmp_path / "p.iwb")
    before = path.read_bytes()

    def read_only(tmp):
        raise PermissionError(errno.EROFS, "Read-only file system", str(tmp))

    monkeypatch.setattr(atomic, "_open_tmp", read_only)
    with pytest.raises(ProjectFileError, match="not writable"):
        save_project(project, path)
    assert path.read_bytes() == before


def test_missing_folder_is_a_clear_error(project, tmp_path):
    with pytest.raises(ProjectFileError, match="does not exist"):
        save_project(project, tmp_path / "no" / "such" / "p.iwb")


def test_object_extras_are_refused_on_save_without_touching_the_file(project, tmp_path):
    path = save_project(project, tmp_path / "p.iwb")
    before = path.read_bytes()
    project.entry("resid").result.extras["bad"] = np.array([object()], dtype=object)
    with pytest.raises(ProjectFileError, match="object"):
        save_project(project, path)
    assert path.read_bytes() == before


def test_reader_example_in_docs_runs(project, tmp_path, monkeypatch, capsys):
    doc = (Path(__file__).resolve().parents[2] / "docs" / "file-format.md").read_text(encoding="utf-8")
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 12
    save_project(project, tmp_path / "session.iwb")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "file-format.md", "exec"), {})
    out = capsys.readouterr().out
    assert "resid partial {'layer': 3, 'position': 4}" in out and "trace complete" in out
