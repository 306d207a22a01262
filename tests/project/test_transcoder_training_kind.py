"""The transcoder_training kind through `interp-workbench run`: equals the engine job, writes a set that the
next analysis of the experiment (attribution_graph) uses, survives the project round trip, exports its curves."""
import csv
import json

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.transcoder_training import TranscoderTrainConfig, transcoder_training_job
from desktop_app.engine.transcoders import load_transcoder_set
from desktop_app.project.specs import analysis_from_dict

PROMPT = "When Mary and John went to the store, John gave a drink to"
TRAIN = {"name": "tc", "kind": "transcoder_training", "architecture": "jumprelu", "width": 32, "l0": 0.05,
         "steps": 40, "batch_size": 128, "lr": 0.003, "buffer_tokens": 1024, "context": 64, "seed": 4, "skip": True}


@pytest.fixture(scope="module")
def setup(gpt2_dir, tmp_path_factory):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    root = tmp_path_factory.mktemp("tc_kind")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(80, seed=6)), encoding="utf-8")
    analyses = [{**TRAIN, "corpus": "corpus.txt", "out": "set"},  # relative to the experiment file
                {"name": "graph", "kind": "attribution_graph", "transcoders": "set", "max_feature_nodes": 30,
                 "max_n_logits": 3}]
    exp = root / "exp.json"
    exp.write_text(json.dumps({"version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
                               "prompts": {"clean": PROMPT}, "analyses": analyses}))
    out = root / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    return dict(root=root, project=load_project(out), iwb=out, corpus=corpus,
                lm=load_model(gpt2_dir, dtype="float32", device="cpu"))


def test_the_kind_equals_the_engine_job_and_writes_a_loadable_set(setup, tmp_path):
    r = setup["project"].entry("tc").result
    assert r.status == "complete", r.message
    assert r.kind == "transcoder_training" and r.dims == ["layer", "step"] and r.labels["layer"] == ["0", "1"]
    cfg = TranscoderTrainConfig(architecture="jumprelu", d_transcoder=32, l0_coefficient=0.05, steps=40,
                                batch_size=128, lr=0.003, buffer_tokens=1024, seed=4, skip=True, log_every=2)
    ref = drive(transcoder_training_job(setup["lm"], setup["corpus"], cfg, tmp_path / "ref", context=64))
    np.testing.assert_array_equal(r.values, ref.values)
    for curve in ("loss", "l0", "explained_variance", "dead_fraction"):
        np.testing.assert_array_equal(r.extras[curve], ref.extras[curve])
    ours = load_transcoder_set(setup["root"] / "set", n_layers=2, d_model=32)
    theirs = load_transcoder_set(tmp_path / "ref")
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.W_enc, b.W_enc) and torch.equal(a.threshold, b.threshold)
        assert torch.equal(a.W_skip, b.W_skip)
    assert r.extras["explained_variance"][:, -1].min() > 0.5


def test_the_next_analysis_builds_a_graph_from_the_trained_set(setup):
    g = setup["project"].entry("graph").result
    assert g.status == "complete", g.message
    assert g.params["transcoders"].endswith("set")
    assert float(g.extras["max_replacement_logit_diff"]) < 1e-5
    kinds = np.asarray(g.extras["node_kind"])
    features = np.asarray(g.extras["node_feature"])[kinds == "feature"]
    assert features.size and features.max() < 32  # features of the 32-wide set trained just before


def test_round_trip_and_curves_csv(setup, tmp_path):
    from desktop_app.cli import main

    r = setup["project"].entry("tc").result
    assert main(["export", str(setup["iwb"]), "--analysis", "tc", "--format", "curves",
                 "--out", str(tmp_path / "c.csv")]) == 0
    rows = list(csv.reader((tmp_path / "c.csv").open()))
    assert rows[0] == ["layer", "step", "loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr"]
    assert len(rows) == 1 + 2 * len(r.labels["step"])
    assert [float(row[2]) for row in rows[1:] if row[0] == "1"] == [float(v) for v in r.values[1]]
    spec = setup["project"].entry("tc").spec
    assert spec.architecture == "jumprelu" and spec.skip is True and spec.layers is None


def test_bad_fields_are_one_sentence():
    with pytest.raises(SpecError, match="more than width"):
        analysis_from_dict({"kind": "transcoder_training", "name": "x", "corpus": "c.txt", "out": "o", "width": 4,
                            "k": 8})
    with pytest.raises(SpecError):
        analysis_from_dict({"kind": "transcoder_training", "name": "x", "corpus": "c.txt", "out": "o",
                            "architecture": "relu"})
