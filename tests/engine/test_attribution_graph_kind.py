"""The attribution_graph kind: run through the CLI from an experiment file, saved, reloaded, exported as graph JSON,
and that JSON re-opened against the model (and refused for another model)."""
import json

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.errors import ProjectFileError
from desktop_app.engine.jobs import drive
from desktop_app.engine.transcoders import fit_transcoders, save_transcoder_set
from desktop_app.project.graph_json import cantor, read_graph_json, uncantor

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def transcoder_dir(lm_gpt2, tmp_path_factory):
    texts = demo_task.corpus(16, seed=2)
    ids = [i[:12] for i in (lm_gpt2.tokenize(t, True).ids for t in texts) if len(i) >= 12]
    tset = drive(fit_transcoders(lm_gpt2, [torch.tensor(ids)], d_transcoder=48, k=4, steps=100))
    return save_transcoder_set(tset, tmp_path_factory.mktemp("tc") / "gpt2", model_name="gpt2")


def test_cantor_pairing_inverts():
    for x in range(40):
        for y in range(0, 3000, 37):
            assert uncantor(cantor(x, y)) == (x, y)


def test_kind_runs_saves_exports_and_json_reopens(gpt2_dir, transcoder_dir, lm_gpt2, lm_llama, tmp_path, capsys):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps({
        "version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"clean": PROMPT, "corrupted": PROMPT},
        "analyses": [{"name": "g", "kind": "attribution_graph", "transcoders": str(transcoder_dir),
                      "max_feature_nodes": 40, "max_n_logits": 3, "node_threshold": 0.7, "edge_threshold": 0.9}]}))
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    result = load_project(out).entry("g").result
    assert result.status == "complete" and result.kind == "attribution_graph"
    ex = result.extras
    n = len(ex["node_ids"])
    assert ex["adjacency"].shape == (n, n) and 0 <= float(ex["replacement_score"]) <= 1
    assert set(ex["node_kind"]) >= {"feature", "error", "embedding", "logit"}

    path = tmp_path / "g.json"
    assert main(["export", str(out), "--analysis", "g", "--format", "json", "--out", str(path)]) == 0
    doc = json.loads(path.read_text())
    assert set(doc) == {"metadata", "qParams", "nodes", "links"}
    assert {"pinnedIds", "supernodes"} <= set(doc["qParams"])
    node = doc["nodes"][0]
    assert {"node_id", "feature", "layer", "ctx_idx", "feature_type", "influence", "activation"} <= set(node)
    assert len(doc["links"]) == int(np.count_nonzero(ex["adjacency"]))

    again = read_graph_json(path, lm_gpt2.info.n_layers, lm_gpt2.info.vocab_size)
    for key in ("node_ids", "node_kind", "node_layer", "node_pos", "node_feature"):
        np.testing.assert_array_equal(again.extras[key], ex[key])
    np.testing.assert_allclose(again.extras["adjacency"], ex["adjacency"], rtol=0, atol=0)
    np.testing.assert_allclose(again.extras["node_influence"], ex["node_influence"], rtol=1e-12)
    np.testing.assert_allclose(again.extras["node_activation"], ex["node_activation"], rtol=1e-12)
    assert float(again.extras["replacement_score"]) == pytest.approx(float(ex["replacement_score"]))

    # pinned ids and supernodes survive a second write
    again.params["pinned_ids"] = [str(ex["node_ids"][0])]
    again.params["supernodes"] = [["group", str(ex["node_ids"][0])]]
    from desktop_app.project.graph_json import write_graph_json
    write_graph_json(again, tmp_path / "g2.json")
    third = read_graph_json(tmp_path / "g2.json", lm_gpt2.info.n_layers, lm_gpt2.info.vocab_size)
    assert third.params["pinned_ids"] == again.params["pinned_ids"]
    assert third.params["supernodes"] == again.params["supernodes"]

    with pytest.raises(ProjectFileError, match="other layers"):
        read_graph_json(path, lm_gpt2.info.n_layers + 1, lm_gpt2.info.vocab_size)
    with pytest.raises(ProjectFileError, match="vocabulary"):
        read_graph_json(path, lm_gpt2.info.n_layers, 3)
