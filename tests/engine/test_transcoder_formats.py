"""Gemma Scope 2, SAELens and circuit-tracer cross-layer transcoder folders written in the test with the real key
names and layouts: the loaded transcoders against numpy straight from the written arrays, a graph on the tiny GPT-2
from each per-layer format, and one sentence for each kind of bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from desktop_app.engine.attribution_graph import FEATURE, LOGIT, attribution_graph_job, build_graph
from desktop_app.engine.errors import SAEError, SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.transcoder_formats import CrossLayerTranscoder
from desktop_app.engine.transcoders import load_transcoder_set

D, W = 32, 48  # the tiny GPT-2's d_model; the transcoders' width (not square, so a transposed matrix cannot pass)
PROMPT = "When Mary and John went to the store, John gave a drink to"


def _f32(d):
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in d.items()}


def gs2_arrays(seed, d=D, w=W, affine=True):
    rng = np.random.default_rng(seed)
    a = {"w_enc": rng.normal(size=(d, w)) * 0.3, "w_dec": rng.normal(size=(w, d)) * 0.3,
         "b_enc": rng.normal(size=w) * 0.1, "b_dec": rng.normal(size=d) * 0.1,
         "threshold": rng.normal(size=w) * 0.3}  # some thresholds negative: relu(pre) * (pre > t) must still hold
    if affine:
        a["affine_skip_connection"] = rng.normal(size=(d, d)) * 0.1
    return _f32(a)


def write_gs2(folder, layer, arrays, **cfg):
    folder.mkdir(parents=True)
    config = {"hf_hook_point_in": f"transformer.h.{layer}.ln_2.output",
              "hf_hook_point_out": f"transformer.h.{layer}.mlp.output", "width": arrays["w_enc"].shape[1],
              "model_name": "tiny/gpt2", "architecture": "jump_relu", "l0": 7,
              "affine_connection": "affine_skip_connection" in arrays, "type": "transcoder"}
    config.update(cfg)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(arrays, str(folder / "params.safetensors"))
    return folder


def gs2_reference(a, x):
    pre = x @ a["w_enc"] + a["b_enc"]
    f = np.maximum(pre, 0) * (pre > a["threshold"])
    out = f @ a["w_dec"] + a["b_dec"]
    if "affine_skip_connection" in a:
        out = out + x @ a["affine_skip_connection"]
    return f, out


def saelens_arrays(seed, arch, d=D, w=W):
    rng = np.random.default_rng(seed)
    a = {"W_enc": rng.normal(size=(d, w)) * 0.3, "W_dec": rng.normal(size=(w, d)) * 0.3,
         "b_enc": rng.normal(size=w) * 0.1, "b_dec": rng.normal(size=d) * 0.1}
    if arch.startswith("jumprelu"):
        a["threshold"] = np.abs(rng.normal(size=w)) * 0.2
    if arch.endswith("skip_transcoder"):
        a["W_skip"] = rng.normal(size=(d, d)) * 0.1
    return _f32(a)


def write_saelens(folder, layer, arrays, arch, metadata=None, **cfg):
    folder.mkdir(parents=True)
    d_in, d_sae = arrays["W_enc"].shape
    config = {"architecture": arch, "d_in": d_in, "d_sae": d_sae, "d_out": arrays["W_dec"].shape[1],
              "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
              "reshape_activations": "none",
              "metadata": {"hook_name": f"blocks.{layer}.ln2.hook_normalized",
                           "hook_name_out": f"blocks.{layer}.hook_mlp_out", "model_name": "tiny-gpt2",
                           "sae_lens_version": "6.5.0", **(metadata or {})}}
    config.update(cfg)
    (folder / "cfg.json").write_text(json.dumps(config))
    save_file(arrays, str(folder / "sae_weights.safetensors"))
    return folder


def saelens_reference(a, x):
    pre = x @ a["W_enc"] + a["b_enc"]
    f = np.maximum(pre, 0)
    if "threshold" in a:
        f = f * (pre > a["threshold"])
    out = f @ a["W_dec"] + a["b_dec"]
    if "W_skip" in a:
        out = out + x @ a["W_skip"].T
    return f, out


def _inputs(seed=7, n=64):
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def _check(tc, f_ref, out_ref, x):
    xt = torch.from_numpy(x)
    with torch.no_grad():
        acts = tc.encode(xt)
        np.testing.assert_allclose(acts.numpy(), f_ref, atol=1e-5)
        np.testing.assert_allclose(tc(xt).numpy(), out_ref, atol=1e-5)
    assert 0 < (f_ref > 0).mean() < 1  # the check saw both active and inactive features


def _one_sentence(excinfo):
    text = str(excinfo.value)
    assert "\n" not in text and text.endswith(".") and len(text) < 400, text


# ---- the loaded transcoders compute what the written arrays say ---------------------------------------------

def test_gemma_scope_2_parent_folder_matches_numpy(tmp_path):
    arrays = [gs2_arrays(0), gs2_arrays(1, affine=False)]
    for L, a in enumerate(arrays):
        write_gs2(tmp_path / "tc" / f"layer_{L}_width_48_l0_small", L, a)
    tset = load_transcoder_set(tmp_path / "tc", n_layers=2, d_model=D)
    assert len(tset) == 2 and tset.config["format"] == "gemma_scope_2"
    assert tset.layers[1].W_skip is None
    x = _inputs()
    for tc, a in zip(tset.layers, arrays):
        _check(tc, *gs2_reference(a, x), x)


def test_gemma_scope_2_single_layer_folder(tmp_path):
    a = gs2_arrays(2)
    folder = write_gs2(tmp_path / "one", 0, a)
    tset = load_transcoder_set(folder, n_layers=1, d_model=D)
    x = _inputs(3)
    _check(tset.layers[0], *gs2_reference(a, x), x)


@pytest.mark.parametrize("arch", ["transcoder", "skip_transcoder", "jumprelu_transcoder", "jumprelu_skip_transcoder"])
def test_saelens_folders_match_numpy(tmp_path, arch):
    arrays = [saelens_arrays(10 + L, arch) for L in range(2)]
    for L, a in enumerate(arrays):
        # one layer's hooks at the top level (older SAELens configs), the other's in metadata
        if L == 0:
            write_saelens(tmp_path / "set" / f"blocks.{L}", L, a, arch, metadata={"hook_name": None,
                                                                                "hook_name_out": None},
                          hook_name=f"blocks.{L}.mlp.hook_in", hook_name_out=f"blocks.{L}.mlp.hook_out")
        else:
            write_saelens(tmp_path / "set" / f"blocks.{L}", L, a, arch)
    tset = load_transcoder_set(tmp_path / "set", n_layers=2, d_model=D)
    assert tset.config["format"] == "saelens"
    x = _inputs(4)
    for tc, a in zip(tset.layers, arrays):
        _check(tc, *saelens_reference(a, x), x)


def test_saelens_log_threshold(tmp_path):
    a = saelens_arrays(5, "jumprelu_transcoder")
    stored = dict(a)
    stored["log_threshold"] = np.log(stored.pop("threshold"))
    folder = write_saelens(tmp_path / "lt", 0, stored, "jumprelu_transcoder")
    x = _inputs(5)
    _check(load_transcoder_set(folder, n_layers=1).layers[0], *saelens_reference(a, x), x)


# ---- graphs on the tiny GPT-2 -------------------------------------------------------------------------------

def _graph_checks(lm, folder):
    tokens = lm.tokenize(PROMPT, True)
    result = drive(attribution_graph_job(lm, tokens, str(folder), max_feature_nodes=40, max_n_logits=3,
                                         desired_logit_prob=0.9))
    assert float(result.extras["max_replacement_logit_diff"]) < 1e-5
    tset = load_transcoder_set(folder, n_layers=lm.info.n_layers, d_model=lm.info.d_model)
    ids = torch.tensor([tokens.ids])
    graph = drive(build_graph(lm, ids, tset, max_feature_nodes=40, max_n_logits=3, desired_logit_prob=0.9))
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits[0, -1].float().numpy()
    np.testing.assert_allclose(graph.replacement_logits, plain, atol=1e-5)
    kinds = np.array(graph.node_kind)
    assert (kinds == FEATURE).sum() > 0
    for t in np.where(kinds == LOGIT)[0]:
        total = graph.adjacency[t].astype(np.float64).sum() + graph.bias[t]
        assert abs(total - plain[graph.node_feature[t]]) < 1e-4


def test_graph_from_gemma_scope_2_set(lm_gpt2, tmp_path):
    for L in range(lm_gpt2.info.n_layers):
        write_gs2(tmp_path / "gs2" / f"layer_{L}_width_48_l0_small", L, gs2_arrays(20 + L))
    _graph_checks(lm_gpt2, tmp_path / "gs2")


def test_graph_from_saelens_set(lm_gpt2, tmp_path):
    for L in range(lm_gpt2.info.n_layers):
        write_saelens(tmp_path / "sl" / f"blocks.{L}", L, saelens_arrays(30 + L, "jumprelu_skip_transcoder"),
                      "jumprelu_skip_transcoder")
    _graph_checks(lm_gpt2, tmp_path / "sl")


# ---- bad input: one sentence each ---------------------------------------------------------------------------

def _gs2_set(root, layers=(0, 1), **cfg):
    for L in layers:
        write_gs2(root / f"layer_{L}", L, gs2_arrays(40 + L), **cfg)
    return root


def _refused(match, folder, **kw):
    with pytest.raises(SAEError, match=match) as e:
        load_transcoder_set(folder, **kw)
    _one_sentence(e)


def test_refuses_another_width_and_layer_count(tmp_path):
    folder = _gs2_set(tmp_path / "set")
    _refused(r"d_model \[32\] but the model's d_model is 64", folder, n_layers=2, d_model=64)
    _refused(r"misses layer\(s\) \[2\]", folder, n_layers=3, d_model=D)
    _refused("transcoders for 2 layers but the model has 1 layers", folder, n_layers=1, d_model=D)


def test_refuses_missing_and_duplicate_layers(tmp_path):
    _refused(r"misses layer\(s\) \[1\]", _gs2_set(tmp_path / "gap", layers=(0, 2)))
    dup = _gs2_set(tmp_path / "dup")
    write_gs2(dup / "layer_1_wider", 1, gs2_arrays(9, w=64))
    _refused("2 transcoders for layer 1 .*keep one folder per layer", dup, n_layers=2)


def test_refuses_hooks_that_are_not_the_mlp(tmp_path):
    _refused("reads 'transformer.h.0.output'", _gs2_set(tmp_path / "a", layers=(0,),
                                                        hf_hook_point_in="transformer.h.0.output"))
    _refused("must reconstruct the MLP's output", _gs2_set(tmp_path / "b", layers=(0,),
                                                           hf_hook_point_out="transformer.h.0.output"))
    _refused("attention's output", _gs2_set(
        tmp_path / "c", layers=(0,), hf_hook_point_in="model.layers.0.post_attention_layernorm.output",
        hf_hook_point_out="model.layers.0.post_feedforward_layernorm.output"))
    _refused("reads layer 0 but writes layer 1", _gs2_set(tmp_path / "d", layers=(0,),
                                                          hf_hook_point_out="transformer.h.1.mlp.output"))
    a = saelens_arrays(1, "transcoder")
    for n, (hook_in, hook_out, match) in enumerate([
            ("blocks.0.hook_resid_pre", "blocks.0.hook_mlp_out", "reads 'blocks.0.hook_resid_pre'"),
            ("blocks.0.hook_mlp_in", "blocks.0.hook_mlp_out", "reads 'blocks.0.hook_mlp_in'"),  # before ln2
            ("blocks.0.ln2.hook_normalized", "blocks.0.hook_resid_post", "writes 'blocks.0.hook_resid_post'")]):
        folder = write_saelens(tmp_path / f"s{n}", 0, a, "transcoder",
                               metadata={"hook_name": hook_in, "hook_name_out": hook_out})
        _refused(match, folder)
    folder = write_saelens(tmp_path / "s_none", 0, a, "transcoder", metadata={"hook_name_out": None})
    _refused("hook_name_out", folder)


def test_refuses_mixed_formats(tmp_path):
    root = tmp_path / "mixed"
    write_gs2(root / "layer_0", 0, gs2_arrays(1))
    write_saelens(root / "blocks.1", 1, saelens_arrays(1, "transcoder"), "transcoder")
    _refused("mixes transcoder formats", root)
    both = write_gs2(tmp_path / "both", 0, gs2_arrays(1))
    (both / "cfg.json").write_text("{}")
    _refused("mixes transcoder formats", both)
    (tmp_path / "empty").mkdir()
    _refused("holds no transcoders", tmp_path / "empty")


def test_refuses_declared_sizes_that_disagree_with_the_tensors(tmp_path):
    _refused("declares width 64 but w_enc", _gs2_set(tmp_path / "w", layers=(0,), width=64))
    a = gs2_arrays(3)
    a["w_enc"] = np.ascontiguousarray(a["w_enc"].T)  # written the other way round
    _refused("w_dec in .* has shape", write_gs2(tmp_path / "t", 0, a, width=D))
    _refused("declares affine_connection False", _gs2_set(tmp_path / "aff", layers=(0,), affine_connection=False))
    folder = write_saelens(tmp_path / "s", 0, saelens_arrays(2, "transcoder"), "transcoder", d_sae=64)
    _refused(r"W_enc in .* has shape \(32, 48\) but d_in 32, d_sae 64", folder)
    folder = write_saelens(tmp_path / "s2", 0, saelens_arrays(2, "transcoder"), "skip_transcoder")
    _refused("has no tensor 'W_skip'", folder)
    folder = write_saelens(tmp_path / "s3", 0, saelens_arrays(2, "transcoder"), "transcoder", d_out=64)
    _refused("reads width 32 but writes width 64", folder)
    # a header that declares more data than the file holds is refused before anything is allocated
    lying = _gs2_set(tmp_path / "lie", layers=(0,))
    weights = lying / "layer_0" / "params.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    _refused("truncated", lying)


def test_refuses_non_finite_weights_and_saes(tmp_path):
    a = gs2_arrays(4)
    a["w_dec"][3, 5] = np.nan
    _refused("NaN or infinite values in w_dec", write_gs2(tmp_path / "nan", 0, a))
    b = saelens_arrays(4, "jumprelu_transcoder")
    b["threshold"][0] = np.inf
    _refused("NaN or infinite values in threshold", write_saelens(tmp_path / "inf", 0, b, "jumprelu_transcoder"))
    _refused("Gemma Scope 2 SAE", _gs2_set(tmp_path / "sae", layers=(0,), type="sae",
                                            hf_hook_point_out="transformer.h.0.ln_2.output"))
    c = saelens_arrays(4, "transcoder")
    _refused("SAELens jumprelu SAE, not a transcoder", write_saelens(tmp_path / "j", 0, c, "jumprelu"))
    _refused("apply_b_dec_to_input", write_saelens(tmp_path / "b", 0, c, "transcoder", apply_b_dec_to_input=True))
    _refused("normalises its input", write_saelens(tmp_path / "n", 0, c, "transcoder",
                                                   normalize_activations="layer_norm"))


# ---- circuit-tracer cross-layer transcoders -----------------------------------------------------------------

def clt_arrays(seed, n_layers=2, d=D, d_t=W, jump=True):
    rng = np.random.default_rng(seed)
    enc, dec = [], []
    for i in range(n_layers):
        e = {f"W_enc_{i}": rng.normal(size=(d_t, d)) * 0.3, f"b_enc_{i}": rng.normal(size=d_t) * 0.1,
             f"b_dec_{i}": rng.normal(size=d) * 0.1}
        if jump:
            e[f"threshold_{i}"] = rng.normal(size=d_t) * 0.3  # negative ones too: circuit-tracer has no relu here
        enc.append(_f32(e))
        dec.append(_f32({f"W_dec_{i}": rng.normal(size=(d_t, n_layers - i, d)) * 0.3}))
    return enc, dec


def write_clt(folder, enc, dec, hook_in="ln2.hook_normalized"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model_kind: cross_layer_transcoder\nfeature_input_hook: {hook_in}\n"
                                        "feature_output_hook: hook_mlp_out\n")
    for i, (e, d) in enumerate(zip(enc, dec)):
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file(d, str(folder / f"W_dec_{i}.safetensors"))
    return folder


@pytest.mark.parametrize("jump", [True, False])
def test_cross_layer_transcoder_matches_numpy(tmp_path, jump):
    n = 3
    enc, dec = clt_arrays(50, n_layers=n, jump=jump)
    clt = load_transcoder_set(write_clt(tmp_path / "clt", enc, dec), n_layers=n, d_model=D)
    assert isinstance(clt, CrossLayerTranscoder) and clt.cross_layer and len(clt) == n and clt.d_model == D
    xs = [_inputs(60 + i) for i in range(n)]
    acts = []
    for i in range(n):
        pre = xs[i] @ enc[i][f"W_enc_{i}"].T + enc[i][f"b_enc_{i}"]
        acts.append(pre * (pre > enc[i][f"threshold_{i}"]) if jump else np.maximum(pre, 0))
    outs = [enc[j][f"b_dec_{j}"] + sum(acts[i] @ dec[i][f"W_dec_{i}"][:, j - i] for i in range(j + 1))
            for j in range(n)]
    with torch.no_grad():
        got_acts = [clt.encode(i, torch.from_numpy(x)).numpy() for i, x in enumerate(xs)]
        got = clt([torch.from_numpy(x) for x in xs])
    for i in range(n):
        np.testing.assert_allclose(got_acts[i], acts[i], atol=1e-5)
        np.testing.assert_allclose(got[i].numpy(), outs[i], atol=1e-5)
    assert all(0 < (a != 0).mean() < 1 for a in acts)


def test_cross_layer_transcoder_refusals(tmp_path, lm_gpt2):
    enc, dec = clt_arrays(51)
    folder = write_clt(tmp_path / "ok", enc, dec)
    # graphs take CLTs now (tests/engine/test_attribution_graph_clt.py); one that does not fit is refused
    with pytest.raises(SpecError, match="does not fit this model") as e:
        drive(build_graph(lm_gpt2, torch.tensor([[1, 2, 3]]), load_transcoder_set(write_clt(
            tmp_path / "wide", *clt_arrays(52, n_layers=2, d=D + 1)), n_layers=2, d_model=D + 1)))
    _one_sentence(e)
    _refused(r"misses layer\(s\) \[2\]", folder, n_layers=3, d_model=D)
    _refused("encoders for 2 layers but the model has 1", folder, n_layers=1, d_model=D)
    _refused(r"d_model \[32\] but the model's d_model is 64", folder, n_layers=2, d_model=64)
    _refused("read 'hook_resid_pre'", write_clt(tmp_path / "pre", enc, dec, hook_in="hook_resid_pre"))
    short = [dict(d) for d in dec]
    short[0]["W_dec_0"] = np.ascontiguousarray(short[0]["W_dec_0"][:, :1])  # decodes only to its own layer
    _refused(r"W_dec_0 in .* has shape \(48, 1, 32\)", write_clt(tmp_path / "short", enc, short))
    bad = [dict(e) for e in enc]
    bad[1]["b_enc_1"] = bad[1]["b_enc_1"].copy()
    bad[1]["b_enc_1"][0] = np.nan
    _refused("NaN or infinite values in b_enc_1", write_clt(tmp_path / "nan", bad, dec))
    extra = [dict(e) for e in enc]
    extra[0]["W_skip"] = np.zeros((D, D), np.float32)
    _refused("holds W_skip", write_clt(tmp_path / "skip", extra, dec))
    listed = write_clt(tmp_path / "listed", enc, dec)
    with open(listed / "config.yaml", "a") as fh:
        fh.write("transcoders:\n  - params_layer_0.safetensors\n")
    _refused("Gemma Scope 2 CLT layout", listed)


def test_attribution_graph_kind_takes_a_gemma_scope_2_folder(gpt2_dir, lm_gpt2, tmp_path):
    from desktop_app.cli import main
    from desktop_app.project.iwb import load_project

    for L in range(lm_gpt2.info.n_layers):
        write_gs2(tmp_path / "gs2" / f"layer_{L}_width_48_l0_small", L, gs2_arrays(70 + L))
    exp = tmp_path / "exp.json"
    exp.write_text(json.dumps({
        "version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"clean": PROMPT, "corrupted": PROMPT},
        "analyses": [{"name": "g", "kind": "attribution_graph", "transcoders": str(tmp_path / "gs2"),
                      "max_feature_nodes": 30, "max_n_logits": 3}]}))
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    result = load_project(out).entry("g").result
    assert result.status == "complete" and float(result.extras["max_replacement_logit_diff"]) < 1e-5


@pytest.mark.parametrize("hook_in,hook_out,expected", [
    ("model.layers.3.post_attention_layernorm.output", "model.layers.3.mlp.output", (3, False)),  # Llama
    ("gpt_neox.layers.1.post_attention_layernorm.output", "gpt_neox.layers.1.mlp.output", (1, False)),  # NeoX
    # a real google/gemma-scope-2-1b-it transcoder config: its output is the MLP's output after the post-norm
    ("model.layers.22.pre_feedforward_layernorm.output", "model.layers.22.post_feedforward_layernorm.output",
     (22, True)),
    ("model.layers.2.mlp.input", "model.layers.2.mlp.output", (2, False))])
def test_gemma_scope_2_hook_names_of_other_families(hook_in, hook_out, expected, tmp_path):
    from desktop_app.engine.transcoder_formats import _hf_hooks

    assert _hf_hooks(hook_in, hook_out, tmp_path) == expected
