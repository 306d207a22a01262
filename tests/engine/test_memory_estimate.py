"""The refusal of a model whose weights cannot fit, from its configuration alone, before anything is allocated."""
import json
import re

import pytest
import torch

from desktop_app.engine import memory_estimate
from desktop_app.engine.errors import ModelLoadError
from desktop_app.engine.loading import load_model
from desktop_app.engine.memory_estimate import count_weights
from desktop_app.engine.quantize import QuantPlan

# Llama-shaped, about 0.27 trillion parameters in few modules (so the meta model builds in milliseconds): more
# than any machine's memory in any dtype, int4 included (~150 GiB).
HUGE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 65536,
        "intermediate_size": 262144, "num_hidden_layers": 2, "num_attention_heads": 64, "num_key_value_heads": 64,
        "vocab_size": 1_000_000, "max_position_embeddings": 2048, "tie_word_embeddings": False}


def _huge_params():
    d, f, v, n = HUGE["hidden_size"], HUGE["intermediate_size"], HUGE["vocab_size"], HUGE["num_hidden_layers"]
    per_layer_linear = 4 * d * d + 3 * d * f
    return n * per_layer_linear, 2 * v * d + (2 * n + 1) * d  # linear; embed + lm_head + norms


def test_count_from_config_is_exact():
    count = count_weights(dict(HUGE))
    linear, other = _huge_params()
    assert (count.linear, count.other) == (linear, other)
    assert count.bytes_for("float32") == 4 * (linear + other)
    assert count.bytes_for("bfloat16", "int8") == linear + 2 * other
    assert count.bytes_for("float32", "int4") == int(linear * (0.5 + 4 / 64) + 4 * other)


def test_count_of_a_real_model_matches_its_parameters(lm_llama, llama_dir):
    config = json.loads((llama_dir / "config.json").read_text())
    assert count_weights(config).total == lm_llama.info.n_params


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_huge_config_without_weights_is_refused(tmp_path, quantize):
    (tmp_path / "config.json").write_text(json.dumps(HUGE))  # no weights, no tokenizer: refused before those
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path, dtype="float32", device="cpu", quantize=quantize)
    msg = str(err.value)
    assert msg.startswith(f"the model in {tmp_path} needs about ") and "\n" not in msg
    assert re.search(r"needs about [\d.]+ GiB for its 26\d\.\dB weights", msg)
    assert "of memory is free on this computer" in msg and msg.endswith("a GPU (device cuda or auto).")
    if quantize == "none":
        assert "dtype bfloat16 (about" in msg and "quantize int8 with dtype bfloat16 (about" in msg
    if quantize == "int8":
        assert "choose dtype bfloat16" not in msg and "choose quantize int4 with dtype bfloat16 (about" in msg
        assert "quantize int8 " not in msg


def test_a_model_just_over_the_free_memory(gpt2_dir, monkeypatch):
    """The tiny model against a pretend free memory: refused in float32, loads with int8 when that fits."""
    config = json.loads((gpt2_dir / "config.json").read_text())
    count = count_weights(config)
    need_f32, need_int8 = count.bytes_for("float32"), count.bytes_for("float32", "int8")
    assert need_int8 < need_f32
    free = int(need_f32 / memory_estimate.FIT_FRACTION) - 1
    monkeypatch.setattr(memory_estimate, "available_for", lambda *_: (free, "this computer"))
    with pytest.raises(ModelLoadError, match=r"quantize int8 with dtype bfloat16 \(about .*MiB\)"):
        load_model(gpt2_dir, dtype="float32", device="cpu")
    assert load_model(gpt2_dir, dtype="float32", device="cpu", quantize="int8").info.quantize == "int8"


def test_unbuildable_config_falls_back_to_safetensors_headers(gpt2_dir, tmp_path):
    import shutil

    folder = shutil.copytree(gpt2_dir, tmp_path / "remote")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "my_remote_arch"
    count = count_weights(cfg, folder)
    from safetensors import safe_open
    with safe_open(folder / "model.safetensors", "pt") as fh:
        total = sum(fh.get_tensor(k).numel() for k in fh.keys())
    assert count is not None and count.total == total and count.stored_bytes is None


def _write_header_only(path, header):
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body)


def test_stored_bytes_follow_the_dtype_and_an_unknown_dtype_gives_no_estimate(tmp_path):
    _write_header_only(tmp_path / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": {"dtype": "U16", "shape": [4, 8], "data_offsets": [0, 64]},
        "model.norm.weight": {"dtype": "F8_E4M3FN", "shape": [8], "data_offsets": [64, 72]}})
    count = count_weights({}, tmp_path, stored=True)
    assert (count.linear, count.other, count.stored_bytes) == (32, 8, 72)
    _write_header_only(tmp_path / "model.safetensors", {
        "model.layers.0.mlp.up_proj.weight": {"dtype": "F4_PACKED", "shape": [4, 8], "data_offsets": [0, 16]}})
    assert count_weights({}, tmp_path, stored=True) is None


def test_refusal_names_the_gpu_when_on_a_gpu():
    count = count_weights(dict(HUGE))
    with pytest.raises(ModelLoadError, match="; choose a GPU with more memory[.]$"):
        memory_estimate.refuse_if_too_big(count, "bfloat16", QuantPlan("int4"), torch.device("cuda", 0), None,
                                          "x", available=2**30)


@pytest.mark.parametrize("quantize", ["none", "int8", "int4"])
def test_estimate_matches_the_memory_measured_after_loading(stories_dir, quantize):
    """The estimate leaves out only the int8 row scales and NF4's per-tensor state: within 5 % of what the
    loaded model's weights take (measured: exact, 3.2 % and 1.9 % under on stories260K)."""
    pytest.importorskip("bitsandbytes")
    count = count_weights(json.loads((stories_dir / "config.json").read_text()))
    measured = load_model(stories_dir, dtype="float32", device="cpu", quantize=quantize).info.memory_bytes
    assert 0.95 * measured <= count.bytes_for("float32", quantize) <= measured
