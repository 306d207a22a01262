"""Pinned nodes and supernodes of an attribution graph (project.graph_subgraph): the edits as undoable commands that
restore the exact params, the summed edges between the subgraph's units against plain loops over the adjacency,
and the supernodes surviving an .iwb save / load and a Neuronpedia JSON write / read."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import graph_subgraph as sg
from desktop_app.project.document import AnalysisEntry, Project
from desktop_app.project.undo import UndoStack

ROOT = Path(__file__).resolve().parents[2]


def _graph(seed=0, n_feat=6) -> AnalysisResult:
    """A small graph of 2 layers over 3 positions: 3 embeddings, n_feat features, 1 error, 2 logits."""
    rng = np.random.default_rng(seed)
    kinds = ["embedding"] * 3 + ["feature"] * n_feat + ["error", "logit", "logit"]
    layers = [-1] * 3 + [int(x) for x in rng.integers(0, 2, n_feat)] + [1, 2, 2]
    pos = [0, 1, 2] + [int(x) for x in rng.integers(0, 3, n_feat)] + [2, 2, 2]
    feats = [5, 7, 9] + list(range(10, 10 + n_feat)) + [-1, 3, 4]
    ids = [f"E_{f}_{p}" for f, p in zip(feats[:3], pos[:3])]
    ids += [f"{L}_{f}_{p}" for L, f, p in zip(layers[3:3 + n_feat], feats[3:3 + n_feat], pos[3:3 + n_feat])]
    ids += ["0_-1_2", "2_3_2", "2_4_2"]
    n = len(ids)
    adj = rng.normal(size=(n, n)).astype(np.float32) * (rng.random((n, n)) < 0.5)
    np.fill_diagonal(adj, 0)
    extras = {"adjacency": adj, "node_ids": np.array(ids), "node_kind": np.array(kinds),
              "node_layer": np.array(layers), "node_pos": np.array(pos), "node_feature": np.array(feats),
              "node_activation": rng.random(n), "node_influence": rng.random(n),
              "prompt_tokens": np.array(["a", "b", "c"]), "node_token_text": np.array([""] * (n - 2) + ["x", "y"]),
              "replacement_score": np.asarray(0.9), "completeness_score": np.asarray(0.95),
              "model_n_layers": np.asarray(2), "model_vocab_size": np.asarray(50)}
    return AnalysisResult(name="g", kind="attribution_graph", params={"scan": "tiny", "transcoders": "t"},
                          dims=["node"], values=np.zeros(n, dtype=np.float32), labels={"node": ids}, extras=extras)


def _project(result):
    from desktop_app.project import kinds

    spec = kinds.get("attribution_graph").spec(name="g", transcoders="t")
    return Project(analyses=[AnalysisEntry(spec, result, result_spec=spec)])


def test_unit_adjacency_is_the_sum_over_members():
    r = _graph(1, n_feat=8)
    adj = r.extras["adjacency"].astype(np.float64)
    ids = [str(i) for i in r.extras["node_ids"]]
    groups = [("A", [ids[3], ids[4], ids[5]]), ("B", [ids[6], ids[0]])]
    pinned = [ids[i] for i in (3, 4, 5, 6, 0, 1, 11, 7)]
    units = sg.units(ids, pinned, groups)
    assert [u[0] for u in units] == ["A", "B", ids[1], ids[11], ids[7]]
    got = sg.unit_adjacency(adj, [idx for _, idx in units])
    for a, (_, ta) in enumerate(units):
        for b, (_, sb) in enumerate(units):
            want = sum(adj[t, s] for t in ta for s in sb)
            assert abs(got[a, b] - want) < 1e-9, (a, b)


def test_edits_and_undo_restore_the_exact_params():
    r = _graph()
    project = _project(r)
    stack = UndoStack(project)
    ids = [str(i) for i in r.extras["node_ids"]]
    states = [copy.deepcopy(r.params)]

    def push(state, text):
        stack.push(sg.SetSubgraph(project, "g", *state, text))
        states.append(copy.deepcopy(r.params))

    def cur():
        return sg.pinned_of(r.params), sg.supernodes_of(r.params)

    for i in (3, 4, 5, 10):
        push(sg.toggled(*cur(), ids[i]), "pin")
    push(sg.grouped(*cur(), "  first  ", [ids[3], ids[4]]), "group")
    push(sg.grouped(*cur(), "second", [ids[5], ids[4], ids[0]]), "group")  # ids[4] moves; ids[0] gets pinned
    assert sg.supernodes_of(r.params) == [("first", [ids[3]]), ("second", [ids[5], ids[4], ids[0]])]
    assert r.params["supernodes"] == [["first", ids[3]], ["second", ids[5], ids[4], ids[0]]]
    push(sg.renamed(*cur(), 1, "Say Mary"), "rename")
    push(sg.toggled(*cur(), ids[3]), "unpin")  # the last member of "first": the supernode goes
    assert sg.supernodes_of(r.params) == [("Say Mary", [ids[5], ids[4], ids[0]])]
    assert ids[3] not in r.params["pinned_ids"]
    push(sg.ungrouped(*cur(), 0), "ungroup")
    assert r.params["supernodes"] == [] and set(r.params["pinned_ids"]) == {ids[4], ids[5], ids[10], ids[0]}
    assert project.dirty
    for k in range(len(states) - 1, 0, -1):
        assert r.params == states[k]
        stack.undo()
    assert r.params == states[0] and "pinned_ids" not in r.params and "supernodes" not in r.params
    for k in range(1, len(states)):
        stack.redo()
        assert r.params == states[k]
    with pytest.raises(SpecError, match="label"):
        sg.grouped(*cur(), "  ", [ids[4]])
    with pytest.raises(SpecError, match="no supernode number 3"):
        sg.renamed(*cur(), 2, "x")


def test_supernodes_survive_iwb_and_json(tmp_path):
    from desktop_app.project.graph_json import read_graph_json, write_graph_json
    from desktop_app.project.iwb import load_project, save_project

    r = _graph(2)
    ids = [str(i) for i in r.extras["node_ids"]]
    project = _project(r)
    state = sg.grouped(*sg.grouped([ids[9]], [], "mover", [ids[3], ids[5]]), "subject «x»", [ids[4], ids[0]])
    UndoStack(project).push(sg.SetSubgraph(project, "g", *state, "group"))
    save_project(project, tmp_path / "p.iwb")
    back = load_project(tmp_path / "p.iwb").entry("g").result
    assert back.params["pinned_ids"] == r.params["pinned_ids"] == [ids[9], ids[3], ids[5], ids[4], ids[0]]
    assert sg.supernodes_of(back.params) == [("mover", [ids[3], ids[5]]), ("subject «x»", [ids[4], ids[0]])]
    doc = json.loads(write_graph_json(back, tmp_path / "g.json").read_text(encoding="utf-8"))
    assert doc["qParams"]["supernodes"] == [["mover", ids[3], ids[5]], ["subject «x»", ids[4], ids[0]]]
    assert doc["qParams"]["pinnedIds"] == back.params["pinned_ids"]
    again = read_graph_json(tmp_path / "g.json", 2, 50)
    assert again.params["supernodes"] == back.params["supernodes"]
    assert again.params["pinned_ids"] == back.params["pinned_ids"]


def test_subgraph_module_imports_without_qt():
    code = ("import sys\nfor m in ('PySide6', 'pyqtgraph', 'torch', 'transformers'): sys.modules[m] = None\n"
            "import desktop_app.project.graph_subgraph\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
