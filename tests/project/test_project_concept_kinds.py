"""The concept kinds (probe, tcav, steering_vector, steering) through the registry: an experiment file runs them
headless, the project keeps their extras, `export --format gguf` writes a control vector that `steering` reads
back, and bad input is one sentence with exit 2."""
import json

import numpy as np
import pytest

from desktop_app.cli import main
from desktop_app.project import kinds
from desktop_app.project.experiment import load_experiment
from desktop_app.project.iwb import load_project
from desktop_app.project.specs import analysis_from_dict

PLACES = ["park", "store", "school", "beach", "office", "market", "garden", "station"]
NAMES = ["Mary", "John", "Alice", "Bob", "Sarah", "James", "Emma", "David"]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _files(tmp_path):
    rows = [{"text": f"{n} went to the {p}", "label": str(i % 2)} for i, (n, p) in
            enumerate((n, p) for n in NAMES for p in PLACES[:3])]
    (tmp_path / "labels.jsonl").write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    (tmp_path / "concept.txt").write_text("\n".join(f"{n} gave a book to Mary" for n in NAMES), encoding="utf-8")
    (tmp_path / "corpus.txt").write_text("\n".join(f"{n} went to the {p}" for n in NAMES for p in PLACES),
                                         encoding="utf-8")
    (tmp_path / "pairs.csv").write_text("positive,negative\n" + "\n".join(
        f"{n} went to the {p} with Mary,{n} went to the {p} with John" for n, p in zip(NAMES, PLACES)),
        encoding="utf-8")


def _experiment(tmp_path, gpt2_dir, analyses):
    path = tmp_path / "exp.json"
    path.write_text(json.dumps({
        "version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"clean": "When Mary and John went to the store, John gave a drink to", "answer": " Mary"},
        "analyses": analyses}))
    return path


def test_concept_kinds_run_save_and_export(gpt2_dir, tmp_path, capsys):
    _files(tmp_path)
    exp = _experiment(tmp_path, gpt2_dir, [
        {"name": "probe", "kind": "probe", "dataset": str(tmp_path / "labels.jsonl"), "position": "mean",
         "test_fraction": 0.25, "seed": 1},
        {"name": "tcav", "kind": "tcav", "concept": str(tmp_path / "concept.txt"), "random": str(tmp_path / "corpus.txt"),
         "runs": 3, "random_size": 5},
        {"name": "sv", "kind": "steering_vector", "pairs": str(tmp_path / "pairs.csv"), "method": "pca"},
    ])
    specs = load_experiment(exp).analyses
    assert [s.kind for s in specs] == ["probe", "tcav", "steering_vector"]
    assert specs[1].concept == (str(tmp_path / "concept.txt"),)
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    project = load_project(out)
    probe, tcav, sv = (project.entry(n).result for n in ("probe", "tcav", "sv"))
    for r in (probe, tcav, sv):
        assert r.status == "complete", r.message
    assert probe.dims == ["layer"] and probe.extras["confusion"].shape == (2, 2, 2)
    assert probe.extras["control_accuracy"].shape == (2,) and probe.params["dataset"].endswith("labels.jsonl")
    assert tcav.extras["p_value"].shape == (2,) and tcav.extras["concept_scores"].shape == (3, 2)
    assert tcav.extras["significant"].dtype == bool
    assert sv.shape == (2, 32) and sv.params["method"] == "pca"
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = {a["name"]: a for a in json.loads(capsys.readouterr().out)["analyses"]}
    assert info["tcav"]["kind"] == "tcav" and info["sv"]["shape"] == [2, 32]

    gguf = pytest.importorskip("gguf")
    assert main(["export", str(out), "--analysis", "sv", "--format", "gguf", "--out", str(tmp_path / "sv.gguf")]) == 0
    reader = gguf.GGUFReader(str(tmp_path / "sv.gguf"))
    assert [t.name for t in reader.tensors] == ["direction.1"]
    np.testing.assert_array_equal(np.array(reader.tensors[0].data), sv.values[1])
    assert main(["export", str(out), "--analysis", "sv", "--out", str(tmp_path / "sv.safetensors")]) == 0
    assert main(["export", str(out), "--analysis", "probe", "--out", str(tmp_path / "probe.npz")]) == 0
    with np.load(tmp_path / "probe.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["values"], probe.values)
        assert z["directions"].shape == (2, 32)
    capsys.readouterr()
    assert main(["export", str(out), "--analysis", "probe", "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "steering_vector" in capsys.readouterr().err

    # the exported control vector, applied back with the steering kind
    exp2 = _experiment(tmp_path, gpt2_dir, [
        {"name": "steer", "kind": "steering", "vector": str(tmp_path / "sv.gguf"), "coefficient": 8.0, "n_continue": 3},
        {"name": "steer_st", "kind": "steering", "vector": str(tmp_path / "sv.safetensors"), "coefficient": 8.0,
         "layers": [1], "n_continue": 3}])
    out2 = tmp_path / "q.iwb"
    assert main(["run", str(exp2), "--out", str(out2), "-q"]) == 0
    project2 = load_project(out2)
    a, b = project2.entry("steer").result, project2.entry("steer_st").result
    assert a.status == "complete" and a.dims == ["which", "rank"] and float(a.extras["kl"]) > 0
    np.testing.assert_allclose(a.values, b.values, atol=1e-6)  # the same direction at the same layer
    assert a.extras["continuation"].shape == (2,)


def test_concept_kinds_bad_input_is_one_line(gpt2_dir, llama_dir, tmp_path, capsys):
    _files(tmp_path)
    (tmp_path / "one.csv").write_text("text,label\nMary went home,a\nJohn went home,a\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    cases = [
        ({"name": "p", "kind": "probe", "dataset": str(tmp_path / "one.csv")}, "only one label"),
        ({"name": "t", "kind": "tcav", "concept": str(tmp_path / "empty.txt"), "random": str(tmp_path / "corpus.txt")},
         "is empty"),
    ]
    for analysis, message in cases:
        out = tmp_path / "bad.iwb"
        capsys.readouterr()
        main(["run", str(_experiment(tmp_path, gpt2_dir, [analysis])), "--out", str(out), "-q"])
        result = load_project(out).entry(analysis["name"]).result
        assert result.status == "failed" and message in result.message, result.message
    # a control vector of another width: llama (d_model 64) directions applied to gpt2 (d_model 32)
    exp = _experiment(tmp_path, llama_dir, [{"name": "sv", "kind": "steering_vector",
                                             "pairs": str(tmp_path / "pairs.csv")}])
    assert main(["run", str(exp), "--out", str(tmp_path / "l.iwb"), "-q"]) == 0
    assert main(["export", str(tmp_path / "l.iwb"), "--analysis", "sv", "--out", str(tmp_path / "l.gguf")]) == 0
    exp = _experiment(tmp_path, gpt2_dir, [{"name": "s", "kind": "steering", "vector": str(tmp_path / "l.gguf")}])
    main(["run", str(exp), "--out", str(tmp_path / "s.iwb"), "-q"])
    result = load_project(tmp_path / "s.iwb").entry("s").result
    assert result.status == "failed" and "width 64 but this model's d_model is 32" in result.message


@pytest.mark.parametrize("d", [
    {"name": "p", "kind": "probe", "dataset": "d.csv", "hook": "resid_pre", "position": "mean", "test_fraction": 0.5,
     "seed": 3, "l2": 0.5},
    {"name": "t", "kind": "tcav", "concept": ["a", "b"], "random": ["c", "d", "e"], "inputs": ["x"], "target": " Mary",
     "hook": "mlp_out", "runs": 4, "random_size": 2, "seed": 1, "alpha": 0.01, "bonferroni": True},
    {"name": "s", "kind": "steering_vector", "positive": ["a"], "negative": ["b"], "method": "pca", "hook": "resid_pre",
     "position": "mean"},
    {"name": "st", "kind": "steering", "vector": "cv.gguf", "coefficient": -2.0, "layers": [1, 2], "prompt": "corrupted",
     "n_continue": 5},
])
def test_concept_specs_round_trip(d):
    spec = analysis_from_dict(d)
    assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert kinds.get(d["kind"]).spec is type(spec)


def test_a_member_marked_encrypted_is_one_sentence(tmp_path):
    """Found by the reader fuzzing once the concept specs changed the project's bytes: zipfile raises a bare
    RuntimeError for a member whose encryption flag is set."""
    import struct
    import zipfile

    from desktop_app.engine.errors import ProjectFileError
    from desktop_app.project.iwb import save_project

    from iwb_testkit import make_project

    path = save_project(make_project(), tmp_path / "p.iwb")
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(".npy"))
    offset = info.header_offset + 6  # the local header's general-purpose flag
    data[offset:offset + 2] = struct.pack("<H", struct.unpack("<H", data[offset:offset + 2])[0] | 1)
    central = data.rfind(b"PK\x01\x02", 0, data.rfind(info.filename.encode()))  # its central directory entry
    data[central + 8:central + 10] = struct.pack("<H", struct.unpack("<H", data[central + 8:central + 10])[0] | 1)
    path.write_bytes(bytes(data))
    with pytest.raises(ProjectFileError, match="encrypted"):
        load_project(path)
