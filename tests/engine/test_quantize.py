"""Quantised models (bitsandbytes int8 / NF4 int4): hooks, exact sweeps on the quantised model, closeness to
float32, memory as stored, checkpoints already quantised, GGUF, and the refusals."""
import json
import shutil

import numpy as np
import pytest
import torch

from desktop_app.engine import quantize
from desktop_app.engine.capture import forward_logits, hooks, run_with_cache
from desktop_app.engine.errors import ModelLoadError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.patching import activation_patching_job
from desktop_app.engine.prompts import prepare_pair

pytest.importorskip("bitsandbytes")

CLEAN = "When Mary and John went, John gave a drink to"
CORRUPTED = "When Mary and John went, Mary gave a drink to"
IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
STORIES = ("Lily and Tim went to the park. Tim gave the ball to",
           "Lily and Tim went to the park. Lily gave the ball to", " Lily", " Tim")
COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head_out")


@pytest.fixture(scope="module", params=["gpt2", "llama", "neox"])
def family_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


@pytest.fixture(scope="module")
def int8_lm(family_dir):
    return load_model(family_dir, dtype="float32", device="cpu", quantize="int8")


def _pair(lm, args=(CLEAN, CORRUPTED, " Mary", " John")):
    return prepare_pair(lm, *args)


def _one_cell_reference(lm, pair, component):
    """One plain forward pass per cell with one slice of the clean run written in (denoise, logit_diff)."""
    kind = "attn.hook_z" if component == "head_out" else component
    names = [hook_name(L, kind) for L in range(lm.info.n_layers)]
    with torch.no_grad():
        with hooks(lm, read=names) as store:
            forward_logits(lm, torch.tensor([pair.clean.ids]))
        shape = [lm.info.n_layers, pair.n_pos] + ([lm.info.n_heads] if component == "head_out" else [])
        out = np.zeros(shape)
        for idx in np.ndindex(*shape):
            name, where = names[idx[0]], (slice(None),) + tuple(idx[1:])

            def patch(act, name=name, where=where):
                act = act.clone()
                act[where] = store[name][where]
                return act
            with hooks(lm, write={name: patch}):
                logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1]
            out[idx] = float(logits[pair.answer_id] - logits[pair.wrong_id])
    return out


def test_quantised_modules_and_every_hook_point_fires(int8_lm):
    lm = int8_lm
    assert lm.info.quantize == "int8"
    assert type(lm.adapter.o_proj(0)).__name__ == "Linear8bitLt"
    names = [hp.name for hp in lm.hook_points()]
    ids = lm.tokenize(CLEAN).ids
    _, store = run_with_cache(lm, ids, names)
    assert set(store) == set(names)
    for hp in lm.hook_points():
        assert store[hp.name].shape[0] == 1 and torch.isfinite(store[hp.name]).all(), hp.name


def test_hook_z_through_the_quantised_output_projection(int8_lm):
    """attn_out is the quantised o_proj applied to hook_z (plus nothing else on these models' attention output)."""
    lm = int8_lm
    ids = torch.tensor([lm.tokenize(CLEAN).ids])
    for layer in range(lm.info.n_layers):
        z_name, out_name = hook_name(layer, "attn.hook_z"), hook_name(layer, "attn_out")
        with torch.no_grad(), hooks(lm, read=[z_name, out_name]) as store:
            forward_logits(lm, ids)
            z = store[z_name]
            again = lm.adapter.o_proj(layer)(z.reshape(*z.shape[:2], -1))
        torch.testing.assert_close(again, store[out_name], atol=1e-5, rtol=0)


@pytest.mark.parametrize("component", COMPONENTS)
def test_sweep_on_the_int8_model_equals_one_forward_per_cell(int8_lm, component):
    """The batched, prefix-reusing sweep is exact on the quantised model too (int8 runs weight-only, so a row
    does not depend on the other rows of its batch)."""
    pair = _pair(int8_lm)
    result = drive(activation_patching_job(int8_lm, pair, component, "each", "denoise", "logit_diff",
                                           batch_size=5))
    np.testing.assert_allclose(result.values, _one_cell_reference(int8_lm, pair, component), atol=1e-5, rtol=0)


# int8 rounds each weight to 1/254 of its row's largest magnitude (half a step of 127 levels), a relative error
# of at most 0.4 % per weight. Measured (logit_diff sweeps, all four components): at most 0.023 on the random
# tiny models, 0.027 on the trained IOI model (whose sweep spans 18.7), 0.047 on stories260K (sweep span 0.39).
# The bounds below leave about 2x room; a hook that failed to write or read on the quantised modules would
# change cells by the size of the sweep's span, far more.
INT8_TOLERANCE = {"tiny": 0.05, "ioi": 0.06, "stories": 0.1}


def _max_sweep_difference(float_lm, int8_lm, args):
    worst, span = 0.0, 0.0
    for component in COMPONENTS:
        a = drive(activation_patching_job(float_lm, _pair(float_lm, args), component, "each", "denoise",
                                          "logit_diff")).values
        b = drive(activation_patching_job(int8_lm, _pair(int8_lm, args), component, "each", "denoise",
                                          "logit_diff")).values
        worst, span = max(worst, float(np.abs(a - b).max())), max(span, float(np.ptp(a)))
    return worst, span


def test_int8_patching_close_to_float32_tiny(family_dir, int8_lm):
    worst, _ = _max_sweep_difference(load_model(family_dir, dtype="float32", device="cpu"), int8_lm,
                                     (CLEAN, CORRUPTED, " Mary", " John"))
    assert 0 < worst < INT8_TOLERANCE["tiny"]


def test_int8_patching_close_to_float32_trained(lm_ioi, ioi_gpt2_dir):
    q = load_model(ioi_gpt2_dir, dtype="float32", device="cpu", quantize="int8")
    worst, span = _max_sweep_difference(lm_ioi, q, (IOI_CLEAN, IOI_CORRUPTED, " Mary", " John"))
    assert 0 < worst < INT8_TOLERANCE["ioi"] and span > 10


def test_int8_patching_close_to_float32_stories(stories_dir):
    f = load_model(stories_dir, dtype="float32", device="cpu")
    q = load_model(stories_dir, dtype="float32", device="cpu", quantize="int8")
    worst, _ = _max_sweep_difference(f, q, STORIES)
    assert 0 < worst < INT8_TOLERANCE["stories"]


def test_memory_as_stored_shrinks(stories_dir):
    sizes = {q: load_model(stories_dir, dtype="float32", device="cpu", quantize=q).info for q in quantize.QUANTIZE}
    assert sizes["none"].memory_bytes == 4 * sizes["none"].n_params  # tied unembedding counted once
    assert sizes["int4"].memory_bytes < sizes["int8"].memory_bytes < 0.4 * sizes["none"].memory_bytes
    assert sizes["int4"].n_params == sizes["int8"].n_params == sizes["none"].n_params  # packed 4-bit unpacked
    assert "int4" in sizes["int4"].summary()


def test_int4_runs_and_gradients_flow(llama_dir):
    lm = load_model(llama_dir, dtype="float32", device="cpu", quantize="int4")
    assert type(lm.adapter.mlp(0).down_proj).__name__ == "Linear4bit"
    emb = lm.adapter.embed(torch.tensor([lm.tokenize(CLEAN).ids])).detach().requires_grad_(True)
    lm.model(inputs_embeds=emb).logits[0, -1, 0].backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_gguf_dequantised_then_int8_equals_folder_int8(llama_dir, tmp_path):
    gguf_util = pytest.importorskip("gguf_util")
    out = tmp_path / "g" / "tiny.gguf"
    out.parent.mkdir()
    gguf_util.write_gguf(llama_dir, out)
    g = load_model(out, dtype="float32", device="cpu", quantize="int8")
    f = load_model(llama_dir, dtype="float32", device="cpu", quantize="int8")
    assert g.source_kind == "gguf" and g.info.quantize == "int8"
    assert g.info.memory_bytes == f.info.memory_bytes
    ids = torch.tensor([f.tokenize(CLEAN).ids])
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(g, ids), forward_logits(f, ids), atol=1e-4, rtol=0)


def test_checkpoint_already_quantised_loads_as_stored(stories_dir, tmp_path):
    q = load_model(stories_dir, dtype="float32", device="cpu", quantize="int8")
    saved = tmp_path / "stories-int8"
    q.model.save_pretrained(saved)
    for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, saved / f)
    assert json.loads((saved / "config.json").read_text())["quantization_config"]["load_in_8bit"]
    p = load_model(saved, dtype="float32", device="cpu")
    assert p.info.quantize == "bitsandbytes 8-bit (as stored)"
    ids = torch.tensor([p.tokenize(STORIES[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(forward_logits(p, ids), forward_logits(q, ids), atol=1e-5, rtol=0)
    with pytest.raises(ModelLoadError, match="already quantised .*quantize none"):
        load_model(saved, dtype="float32", device="cpu", quantize="int4")


def test_checkpoint_quantised_with_a_missing_library(gpt2_dir, tmp_path):
    folder = shutil.copytree(gpt2_dir, tmp_path / "gptq")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_model(folder, device="cpu")
    msg = str(err.value)
    assert "stored quantised (gptq)" in msg and "install" in msg and "\n" not in msg


def test_unknown_choice_and_missing_library(gpt2_dir, monkeypatch):
    with pytest.raises(ModelLoadError, match="unknown quantize 'int3'"):
        load_model(gpt2_dir, quantize="int3")

    def missing():
        raise ImportError("No module named 'bitsandbytes'")
    monkeypatch.setattr(quantize, "_import_bnb", missing)
    with pytest.raises(ModelLoadError, match=r"needs the bitsandbytes package.*quantize none to load the model "
                                             "unquantised"):
        load_model(gpt2_dir, device="cpu", quantize="int8")


def test_platform_that_cannot_run_the_quantisation(gpt2_dir, monkeypatch):
    """transformers' environment check fails (as on a machine with no bitsandbytes backend for the device):
    one sentence, and nothing loads unquantised behind the user's back."""
    from transformers.quantizers import AutoHfQuantizer

    class NoBackend:
        def validate_environment(self, **_):
            raise RuntimeError("No supported bitsandbytes backend for this device.\nmore lines")
    monkeypatch.setattr(AutoHfQuantizer, "from_config", classmethod(lambda cls, *a, **k: NoBackend()))
    with pytest.raises(ModelLoadError) as err:
        load_model(gpt2_dir, device="cpu", quantize="int4")
    msg = str(err.value)
    assert msg.startswith("quantize int4 cannot run on cpu") and "quantize none" in msg and "\n" not in msg
