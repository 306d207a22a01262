"""The SAE workflow kinds run from an experiment file (interp-workbench run) equal the same work through the
engine API, survive a project round trip and export as the contract says."""
import csv
import json

import numpy as np
import pytest
import torch
from sae_helpers import random_sae

from desktop_app import demo_task
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.sae.dashboards import build_dashboards_job, dashboards_to_list
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.jobs import sae_intervention_job, sae_metrics_job, sae_training_job
from desktop_app.engine.sae.training import TrainConfig
from desktop_app.project.specs import analysis_from_dict

HOOK = "blocks.1.hook_resid_pre"
PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def setup(gpt2_dir, tmp_path_factory):
    """One experiment with the four kinds, run through the CLI once; the project and the inputs."""
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    root = tmp_path_factory.mktemp("sae_kinds")
    sae_dir = save_saelens(random_sae(HOOK, d_sae=24, seed=3), root / "sae")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(40, seed=6)))
    edits = [{"feature": 3, "op": "clamp", "value": 4.0, "positions": None},
             {"feature": 5, "op": "ablate", "value": 0.0, "positions": [2, 3]}]
    analyses = [
        {"name": "train", "kind": "sae_training", "hook": HOOK, "corpus": str(corpus), "out": str(root / "trained"),
         "architecture": "jumprelu", "width": 32, "l0": 0.1, "steps": 40, "batch_size": 128, "lr_warmup_steps": 5,
         "seed": 2},
        {"name": "dash", "kind": "sae_dashboards", "sae": str(sae_dir), "corpus": str(corpus), "top_n": 5,
         "n_top": 3, "window": 2},
        {"name": "edit", "kind": "sae_edit", "sae": str(sae_dir), "edits": edits, "n_continue": 3, "top_n": 5},
        {"name": "metrics", "kind": "sae_metrics", "sae": str(sae_dir), "corpus": str(corpus), "max_texts": 6},
    ]
    exp = root / "exp.json"
    exp.write_text(json.dumps({"version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
                               "prompts": {"clean": PROMPT}, "analyses": analyses}))
    out = root / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    lm = load_model(gpt2_dir, dtype="float32", device="cpu")
    return dict(root=root, project=load_project(out), iwb=out, lm=lm, sae_dir=sae_dir, corpus=corpus,
                edits=edits, analyses={a["name"]: a for a in analyses})


def result(setup, name):
    r = setup["project"].entry(name).result
    assert r.status == "complete", r.message
    return r


def test_training_kind_equals_the_engine_job(setup, tmp_path):
    r = result(setup, "train")
    assert r.kind == "sae_training" and r.dims == ["step"]
    cfg = TrainConfig(architecture="jumprelu", d_sae=32, l0_coefficient=0.1, steps=40, batch_size=128,
                      lr_warmup_steps=5, seed=2, log_every=2, k=16, l1_coefficient=5.0)
    ref = drive(sae_training_job(setup["lm"], HOOK, setup["corpus"], cfg, tmp_path / "ref"))
    metrics = ref.labels["metric"]
    np.testing.assert_array_equal(r.values, ref.values[:, metrics.index("loss")])
    for i, m in enumerate(metrics):
        np.testing.assert_array_equal(r.extras[m], ref.values[:, i])
    assert r.labels["step"] == ref.labels["step"]
    ours, theirs = load_sae(setup["root"] / "trained"), load_sae(tmp_path / "ref")
    assert ours.cfg.architecture == "jumprelu" and ours.hook_name == HOOK
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key


def test_training_curves_export_as_csv(setup, tmp_path):
    from desktop_app.cli import main

    assert main(["export", str(setup["iwb"]), "--analysis", "train", "--format", "curves",
                 "--out", str(tmp_path / "c.csv")]) == 0
    rows = list(csv.reader((tmp_path / "c.csv").open()))
    r = result(setup, "train")
    assert rows[0] == ["step", "loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr"]
    assert [row[0] for row in rows[1:]] == r.labels["step"]
    np.testing.assert_array_equal([float(row[1]) for row in rows[1:]], r.values)
    np.testing.assert_array_equal([float(row[3]) for row in rows[1:]], r.extras["explained_variance"])


def test_dashboards_kind_equals_the_engine_job_and_exports(setup, tmp_path):
    from desktop_app.cli import main

    r = result(setup, "dash")
    ref = drive(build_dashboards_job(setup["lm"], setup["sae_dir"], setup["corpus"], n_top=3, context=2))
    ref = sorted(dashboards_to_list(ref), key=lambda d: (-d["density"], d["feature"]))[:5]
    assert r.labels["feature"] == [str(d["feature"]) for d in ref]
    np.testing.assert_array_equal(r.values, np.array([d["density"] for d in ref], dtype=np.float32))
    assert main(["export", str(setup["iwb"]), "--analysis", "dash", "--format", "json",
                 "--out", str(tmp_path / "d.json")]) == 0
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["kind"] == "sae_dashboards" and doc["dashboards"] == json.loads(json.dumps(ref))
    assert main(["export", str(setup["iwb"]), "--analysis", "dash", "--out", str(tmp_path / "d.html")]) == 0
    page = (tmp_path / "d.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page
    for d in ref:
        assert f"<h2>Feature {d['feature']}</h2>" in page


def _edited_logits_by_hand(lm, sae_dir, edits, ids):
    """Reference: a forward pre-hook on GPT-2 block 1 (its input is blocks.1.hook_resid_pre) that encodes with
    the SAE, edits the features, decodes and adds the SAE's error term back; plain HF forward passes."""
    sae = load_sae(sae_dir)

    def pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        f = sae.encode(x).clone()
        x_hat = sae.decode(sae.encode(x))
        for e in edits:
            pos = slice(None) if e["positions"] is None else list(e["positions"])
            if e["op"] == "ablate":
                f[:, pos, e["feature"]] = 0.0
            elif e["op"] == "clamp":
                f[:, pos, e["feature"]] = e["value"]
            else:
                f[:, pos, e["feature"]] += e["value"]
        y = sae.decode(f) + (x - x_hat)
        return ((y,) + tuple(args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": y})

    with torch.no_grad():
        before = lm.model(ids).logits[0].float()
        handle = lm.model.transformer.h[1].register_forward_pre_hook(pre, with_kwargs=True)
        try:
            after = lm.model(ids).logits[0].float()
        finally:
            handle.remove()
    return before, after


def test_edit_kind_follows_the_contract_and_equals_an_independent_hook(setup):
    r = result(setup, "edit")
    lm = setup["lm"]
    ids = torch.tensor([lm.tokenize(PROMPT).ids])
    n = ids.shape[1]
    assert r.kind == "sae_edit" and r.dims == ["position", "vocab_top_k"] and r.values.shape == (n, 5)
    shown = lm.tokenize(PROMPT).display
    assert r.labels["position"] == [f"{i}: {t}" for i, t in enumerate(shown)]
    assert r.labels["vocab_top_k"] == ["1", "2", "3", "4", "5"]
    before, after = _edited_logits_by_hand(lm, setup["sae_dir"], setup["edits"], ids)
    p_before, p_after = before.softmax(-1), after.softmax(-1)
    ref_p, ref_ids = p_after.topk(5, dim=-1)
    np.testing.assert_array_equal(r.extras["top_token_ids"], ref_ids.numpy())
    np.testing.assert_allclose(r.values, ref_p.numpy(), atol=1e-5)
    np.testing.assert_allclose(r.extras["probs_after"], ref_p.numpy(), atol=1e-5)
    np.testing.assert_allclose(r.extras["probs_before"], p_before.gather(-1, ref_ids).numpy(), atol=1e-5)
    kl = (p_before * (before.log_softmax(-1) - after.log_softmax(-1))).sum(-1)
    np.testing.assert_allclose(r.extras["kl"], kl.numpy(), atol=1e-5)
    assert float(np.abs(r.extras["kl"]).max()) > 1e-4  # the edit changed something
    # greedy continuations equal the engine job's (the engine's data is kept)
    edits = [{"feature": e["feature"], "mode": e["op"], "value": e["value"], "positions": e["positions"]}
             for e in setup["edits"]]
    ref = drive(sae_intervention_job(lm, setup["sae_dir"], PROMPT, edits, n_continue=3, top_n=5))
    np.testing.assert_array_equal(r.extras["continuation"], ref.extras["continuation"])
    np.testing.assert_array_equal(r.extras["last_probs"], ref.values)
    np.testing.assert_allclose(r.extras["kl"][-1], float(ref.extras["kl"]), atol=1e-6)
    spec = setup["project"].entry("edit").spec
    assert spec.to_dict()["edits"] == setup["edits"]  # written back as objects


def test_edit_exports_json_and_shows_details(setup, tmp_path):
    from desktop_app.cli import main
    from desktop_app.project import kinds

    r = result(setup, "edit")
    assert main(["export", str(setup["iwb"]), "--analysis", "edit", "--format", "json",
                 "--out", str(tmp_path / "e.json")]) == 0
    doc = json.loads((tmp_path / "e.json").read_text())
    assert [p["position"] for p in doc["positions"]] == r.labels["position"]
    last = doc["positions"][-1]
    assert [t["token_id"] for t in last["top"]] == r.extras["top_token_ids"][-1].tolist()
    np.testing.assert_allclose([t["before"] for t in last["top"]], r.extras["probs_before"][-1], atol=1e-7)
    np.testing.assert_allclose([t["after"] for t in last["top"]], r.values[-1], atol=1e-7)
    assert doc["continuation_after"] == str(r.extras["continuation"][1])
    text = kinds.get("sae_edit").details(r, {"position": 2, "vocab_top_k": 0})
    assert r.labels["position"][2] in text and f"{float(r.values[2, 0]):.4g}" in text


def test_metrics_kind_equals_the_engine_job(setup):
    from desktop_app.engine.sae.corpus import read_corpus

    r = result(setup, "metrics")
    ref = drive(sae_metrics_job(setup["lm"], setup["sae_dir"], read_corpus(setup["corpus"], max_texts=6)))
    assert r.labels["metric"] == ref.labels["metric"]
    np.testing.assert_array_equal(r.values, ref.values)


def test_specs_round_trip_and_refuse_bad_fields(setup):
    for a in setup["analyses"].values():
        spec = analysis_from_dict(a)
        assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    base = dict(setup["analyses"]["edit"])
    with pytest.raises(SpecError, match="use ablate, clamp or steer"):
        analysis_from_dict({**base, "edits": [{"feature": 1, "op": "boost"}]})
    with pytest.raises(SpecError, match="'hook' is needed"):
        analysis_from_dict({k: v for k, v in setup["analyses"]["train"].items() if k != "hook"})
    # the panel's lines (JSON text) give the same spec as objects
    assert analysis_from_dict({**base, "edits": [json.dumps(e) for e in setup["edits"]]}) == analysis_from_dict(base)


def test_a_mismatched_hook_fails_the_analysis_with_the_message(setup, tmp_path):
    from desktop_app.project.execute import analysis_job
    from desktop_app.project.specs import Prompts

    spec = analysis_from_dict({"name": "m", "kind": "sae_metrics", "sae": str(setup["sae_dir"]),
                               "corpus": str(setup["corpus"]), "hook": "blocks.0.hook_resid_pre", "max_texts": 2})
    from desktop_app.engine.errors import SAEError
    with pytest.raises(SAEError, match=f"trained on {HOOK} but is applied to blocks.0.hook_resid_pre"):
        drive(analysis_job(setup["lm"], Prompts(clean=PROMPT), spec))
    forced = analysis_from_dict({**spec.to_dict(), "force_hook": True})
    assert drive(analysis_job(setup["lm"], Prompts(clean=PROMPT), forced)).params["force_hook"] is True
