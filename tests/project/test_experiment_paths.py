"""Paths inside an experiment file are relative to the experiment file, for every spec field marked path=True."""
import json
import os

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.project.experiment import load_experiment, save_experiment

HOOK = "blocks.1.hook_resid_pre"


def _experiment(folder, model_path, analyses):
    exp = folder / "exp.json"
    exp.write_text(json.dumps({"version": 1, "model": {"path": str(model_path), "dtype": "float32", "device": "cpu"},
                               "prompts": {"clean": "When Mary and John went to the store, John gave a drink to"},
                               "analyses": analyses}))
    return exp


def test_every_path_field_is_read_relative_to_the_experiment_file(tmp_path, monkeypatch):
    folder = tmp_path / "exps"
    (folder / "data").mkdir(parents=True)
    for name in ("concept.txt", "random.txt", "pos.txt", "labels.csv"):
        (folder / "data" / name).write_text("a\nb\n")
    analyses = [
        {"name": "m", "kind": "sae_metrics", "sae": "saes/one", "corpus": "data/c.txt"},
        {"name": "t", "kind": "sae_training", "hook": HOOK, "corpus": "data/c.txt", "out": "../trained"},
        {"name": "p", "kind": "probe", "dataset": "data/labels.csv"},
        {"name": "c", "kind": "tcav", "concept": ["data/concept.txt"], "random": "data/random.txt",
         "inputs": ["a literal text.txt"]},
        {"name": "s", "kind": "steering_vector", "positive": ["data/pos.txt"], "negative": ["two", "texts"]},
        {"name": "l", "kind": "logit_lens", "lens": "tuned", "lens_path": "lenses/tl"},
        {"name": "abs", "kind": "sae_metrics", "sae": str(tmp_path / "elsewhere"), "corpus": "~/corpus.txt"},
    ]
    exp = _experiment(folder, "model", analyses)
    monkeypatch.chdir(tmp_path)  # another working directory
    e = load_experiment("exps/exp.json")
    base = str(folder.resolve())
    j = lambda *p: os.path.normpath(os.path.join(base, *p))  # noqa: E731
    assert e.model.path == j("model")
    assert (e.analysis("m").sae, e.analysis("m").corpus) == (j("saes/one"), j("data/c.txt"))
    assert e.analysis("t").out == os.path.normpath(str(tmp_path.resolve() / "trained"))
    assert e.analysis("p").dataset == j("data/labels.csv")
    c = e.analysis("c")
    assert c.concept == (j("data/concept.txt"),) and c.random == (j("data/random.txt"),)
    assert c.inputs == ("a literal text.txt",)  # names no file beside the experiment: a text, left alone
    assert e.analysis("s").positive == (j("data/pos.txt"),) and e.analysis("s").negative == ("two", "texts")
    assert e.analysis("l").lens_path == j("lenses/tl")
    assert e.analysis("abs").sae == str(tmp_path / "elsewhere")
    assert e.analysis("abs").corpus == os.path.expanduser("~/corpus.txt")

    # written back relative to the new file's folder, and read again to the same absolute paths
    other = tmp_path / "other"
    other.mkdir()
    save_experiment(e, other / "copy.json")
    written = {a["name"]: a for a in json.loads((other / "copy.json").read_text())["analyses"]}
    assert written["m"]["sae"] == os.path.join("..", "exps", "saes", "one")
    assert written["c"]["concept"] == [os.path.join("..", "exps", "data", "concept.txt")]
    again = load_experiment(other / "copy.json")
    for spec in e.analyses:
        assert again.analysis(spec.name).to_dict() == spec.to_dict(), spec.name


def test_an_experiment_in_another_folder_runs_from_another_cwd(gpt2_dir, tmp_path, monkeypatch):
    from desktop_app.cli import main
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.jobs import sae_metrics_job
    from desktop_app.engine.sae.model import SAE, SAEConfig
    from desktop_app.project.iwb import load_project

    folder = tmp_path / "study" / "exp"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=16, hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape) * 0.3)
    save_saelens(sae, folder / "sae")
    texts = demo_task.corpus(4, seed=1)
    (folder / "corpus.txt").write_text("\n".join(texts))
    exp = _experiment(folder, os.path.relpath(gpt2_dir, folder), [
        {"name": "metrics", "kind": "sae_metrics", "sae": "sae", "corpus": "corpus.txt"},
        {"name": "train", "kind": "sae_training", "hook": HOOK, "corpus": "corpus.txt", "out": "trained",
         "width": 8, "k": 2, "steps": 3, "batch_size": 16, "tokens": 200, "cache": False}])
    cwd = tmp_path / "somewhere_else"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["run", os.path.relpath(exp, cwd), "--out", "p.iwb", "-q"]) == 0
    project = load_project(cwd / "p.iwb")
    r = project.entry("metrics").result
    assert r.status == "complete", r.message
    ref = drive(sae_metrics_job(load_model(gpt2_dir, dtype="float32", device="cpu"), folder / "sae", texts))
    np.testing.assert_allclose(r.values, ref.values, rtol=1e-6, atol=1e-6)
    assert project.entry("train").result.status == "complete", project.entry("train").result.message
    assert (folder / "trained" / "cfg.json").is_file() and not (cwd / "trained").exists()
