"""The bundled demo (resources/demo, built by packaging/train_demo.py) and the desktop packaging files.

The demo model must do IOI on sentences it was not trained on, the demo SAE must fit its hook, the demo
experiment must load, and the patching heatmap must look the way packaging/demo-facts.json (and so the
user guide) says. Patched runs are checked against a plain Hugging Face forward pass with a pre-hook.
"""
import configparser
import json
import struct
import sys
from pathlib import Path

import pytest

from desktop_app import demo_assets

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "resources" / "demo"
FACTS = REPO / "packaging" / "demo-facts.json"
HELDOUT_SEED = 4242  # the model trains on ioi_examples(seed=1); the tokenizer on corpus(seed=0)


@pytest.fixture(scope="module")
def facts():
    return json.loads(FACTS.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo_lm():
    from desktop_app.engine.loading import load_model

    return load_model(DEMO / "model", dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def experiment():
    from desktop_app.project.experiment import load_experiment

    return load_experiment(DEMO / "experiment.json")


# ---- locating the demo ---------------------------------------------------------------------------------

def test_demo_dir_in_a_source_checkout(monkeypatch):
    monkeypatch.delenv(demo_assets.DEMO_DIR_ENV, raising=False)
    assert demo_assets.demo_dir() == DEMO
    assert demo_assets.demo_experiment_path() == DEMO / "experiment.json"
    assert demo_assets.demo_model_dir() == DEMO / "model"
    assert demo_assets.demo_sae_dir() == DEMO / "sae"
    assert (demo_assets.demo_model_dir() / "config.json").is_file()
    assert (demo_assets.demo_sae_dir() / "cfg.json").is_file()


def test_demo_dir_in_a_pyinstaller_bundle(monkeypatch, tmp_path):
    monkeypatch.delenv(demo_assets.DEMO_DIR_ENV, raising=False)
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    monkeypatch.setattr(sys, "_MEIPASS", str(tmp_path), raising=False)
    assert demo_assets.demo_dir() == tmp_path / "resources" / "demo"
    assert demo_assets.demo_model_dir() == tmp_path / "resources" / "demo" / "model"


def test_demo_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv(demo_assets.DEMO_DIR_ENV, str(tmp_path))
    assert demo_assets.demo_experiment_path() == tmp_path / "experiment.json"


def test_demo_is_small():
    total = sum(f.stat().st_size for f in DEMO.rglob("*") if f.is_file())
    assert total < 5 * 2**20, f"resources/demo is {total / 2**20:.1f} MiB"


# ---- the model ---------------------------------------------------------------------------------------

def test_demo_model_does_ioi_on_heldout_sentences(demo_lm):
    import torch

    from desktop_app.demo_task import ioi_examples

    examples = ioi_examples(50, seed=HELDOUT_SEED)
    rows = [demo_lm.tokenize(ex.clean).ids for ex in examples]
    ids = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # right padding: causal, harmless
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
    with torch.no_grad():
        logits = demo_lm.model(ids).logits
    wins = 0
    for i, ex in enumerate(examples):
        last = logits[i, len(rows[i]) - 1]
        wins += bool(last[demo_lm.single_token_id(ex.answer)] > last[demo_lm.single_token_id(ex.wrong)])
    assert wins / len(examples) >= 0.85, f"IOI accuracy {wins}/{len(examples)}"


def test_demo_model_shape_matches_facts(demo_lm, facts):
    assert demo_lm.info.model_type == "gpt2"
    assert demo_lm.info.n_layers == facts["model"]["n_layer"]
    assert demo_lm.info.d_model == facts["model"]["n_embd"]
    assert demo_lm.info.n_heads == facts["model"]["n_head"]


# ---- the SAE -----------------------------------------------------------------------------------------

def test_demo_sae_loads_fits_and_reconstructs(demo_lm, facts):
    import torch

    from desktop_app.demo_task import corpus
    from desktop_app.engine.capture import run_with_cache
    from desktop_app.engine.sae.formats import check_fits, load_sae

    sae = load_sae(DEMO / "sae")
    assert sae.cfg.hook_name == facts["sae"]["hook"]
    assert sae.cfg.architecture == "topk" and sae.cfg.k == facts["sae"]["k"]
    check_fits(sae, sae.cfg.hook_name, demo_lm.hook_point(sae.cfg.hook_name).shape)
    assert sae.d_in == demo_lm.info.d_model

    text = corpus(1, seed=HELDOUT_SEED)[0]
    _, acts = run_with_cache(demo_lm, [demo_lm.tokenize(text).ids], [sae.cfg.hook_name])
    x = acts[sae.cfg.hook_name][0].float()
    with torch.no_grad():
        x_hat, f = sae(x)
    # explained variance computed here, not with the engine's helper
    ev = 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum()
    assert float(ev) > 0.8
    assert ((f != 0).sum(dim=-1) <= sae.cfg.k).all()


# ---- the experiment and its heatmap ------------------------------------------------------------------

def test_demo_experiment_loads(experiment, demo_lm):
    assert Path(experiment.model.path) == DEMO / "model"
    assert json.loads((DEMO / "experiment.json").read_text())["model"]["path"] == "model"
    by_name = {a.name: a for a in experiment.analyses}
    assert by_name["resid"].kind == "activation_patching" and by_name["resid"].component == "resid_pre"
    assert by_name["resid"].positions == "each" and by_name["resid"].direction == "denoise"
    assert by_name["heads"].component == "head_out" and by_name["heads"].positions == "all"
    assert by_name["attribution"].kind == "attribution_patching"
    assert by_name["attribution"].component == "resid_pre"
    p = experiment.prompts
    assert demo_lm.is_single_token(p.answer) and demo_lm.is_single_token(p.wrong_answer)
    assert len(demo_lm.tokenize(p.clean).ids) == len(demo_lm.tokenize(p.corrupted).ids)


def _reference_recovered(lm, clean_ids, corrupted_ids, layer, pos, answer, wrong):
    """One plain forward pass of the corrupted prompt with the clean resid_pre[layer][pos] written in."""
    import torch

    model = lm.model
    with torch.no_grad():
        clean_out = model(torch.tensor([clean_ids]), output_hidden_states=True)
        corrupted_logits = model(torch.tensor([corrupted_ids])).logits[0, -1]
    clean_resid = clean_out.hidden_states[layer][0, pos]  # GPT-2: hidden_states[L] is the input of block L

    def patch(module, args, kwargs):
        if args:
            hidden = args[0].clone()
            hidden[0, pos] = clean_resid
            return (hidden, *args[1:]), kwargs
        hidden = kwargs["hidden_states"].clone()
        hidden[0, pos] = clean_resid
        return args, {**kwargs, "hidden_states": hidden}

    handle = model.transformer.h[layer].register_forward_pre_hook(patch, with_kwargs=True)
    try:
        with torch.no_grad():
            patched = model(torch.tensor([corrupted_ids])).logits[0, -1]
    finally:
        handle.remove()
    ld = lambda lg: float(lg[answer] - lg[wrong])  # noqa: E731
    clean_ld = ld(clean_out.logits[0, -1])
    return (ld(patched) - ld(corrupted_logits)) / (clean_ld - ld(corrupted_logits))


def test_resid_heatmap_is_where_the_facts_say(demo_lm, experiment, facts):
    import numpy as np

    from desktop_app.engine.jobs import drive
    from desktop_app.engine.patching import activation_patching_job
    from desktop_app.engine.prompts import prepare_pair

    spec = experiment.analysis("resid")
    p = experiment.prompts
    pair = prepare_pair(demo_lm, p.clean, p.corrupted, p.answer, p.wrong_answer)
    result = drive(activation_patching_job(demo_lm, pair, spec.component, spec.positions, spec.direction,
                                           spec.metric, name=spec.name))
    values = np.asarray(result.values)
    assert result.status == "complete" and values.shape == (demo_lm.info.n_layers, pair.n_pos)

    s2, last = facts["patching"]["s2_position"], facts["patching"]["final_position"]
    assert last == pair.n_pos - 1
    assert [i for i, (a, b) in enumerate(zip(pair.clean.ids, pair.corrupted.ids)) if a != b] == [s2]
    for row in facts["patching"]["resid"]["strongest_position_per_layer"]:
        assert int(np.nanargmax(np.abs(values[row["layer"]]))) == row["position"]
        assert values[row["layer"], row["position"]] == pytest.approx(row["value"], abs=0.02)
    # the story the guide tells: S2 carries everything at layer 0, the final position at the last layer
    assert values[0, s2] == pytest.approx(1.0, abs=1e-4)
    assert int(np.nanargmax(values[-1])) == last
    for layer, pos in [(0, s2), (1, s2), (1, last), (values.shape[0] - 1, last)]:
        ref = _reference_recovered(demo_lm, pair.clean.ids, pair.corrupted.ids, layer, pos,
                                   pair.answer_id, pair.wrong_id)
        assert values[layer, pos] == pytest.approx(ref, abs=1e-4)


# ---- packaging files ---------------------------------------------------------------------------------

def test_icon_png_is_256_square():
    data = (REPO / "resources" / "icon.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (256, 256)
    assert "<svg" in (REPO / "resources" / "icon.svg").read_text(encoding="utf-8")


def test_desktop_entry():
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    parser.read(REPO / "packaging" / "interp-workbench.desktop", encoding="utf-8")
    entry = parser["Desktop Entry"]
    assert entry["Type"] == "Application" and entry["Exec"].split()[0] == "interp-workbench"
    assert entry["Icon"] == "interp-workbench" and entry["Terminal"] == "false"
