"""The loader: every supported family, the facts it reports, progress, and each bad input's message."""
import json
import shutil

import pytest

from desktop_app.engine.errors import ModelLoadError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.loading import load_model
from desktop_app.engine.errors import JobCancelled


def test_info_of_each_family(lm_gpt2, lm_llama, lm_neox):
    assert lm_gpt2.info.model_type == "gpt2" and lm_gpt2.adapter.family == "gpt2"
    assert lm_llama.info.n_heads == 4 and lm_llama.info.n_kv_heads == 2
    assert lm_llama.adapter.family == "llama"
    assert lm_neox.info.parallel_attn_mlp and lm_neox.adapter.family == "gpt_neox"
    for lm in (lm_gpt2, lm_llama, lm_neox):
        i = lm.info
        assert i.n_layers == 2 and i.d_head * i.n_heads == i.d_model
        assert i.n_params == sum(p.numel() for p in lm.model.parameters())
        assert i.memory_bytes >= 4 * i.n_params and i.device == "cpu" and i.dtype == "float32"
        assert i.vocab_size >= 400 and i.n_ctx >= 64
        assert "layers" in i.summary()


def test_stories_real_model(stories_dir):
    lm = load_model(stories_dir)
    assert (lm.info.n_layers, lm.info.n_heads, lm.info.n_kv_heads, lm.info.d_model) == (5, 8, 4, 64)
    assert lm.info.architecture == "LlamaForCausalLM"


def test_progress_events(gpt2_dir):
    events = []
    load_model(gpt2_dir, on_progress=events.append)
    assert all(isinstance(e, Progress) for e in events)
    assert events[0].done == 0 and events[-1].done == events[-1].total
    assert any("weights" in e.message for e in events)


def test_cancel_while_loading(gpt2_dir):
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        load_model(gpt2_dir, cancel=token)


def test_gguf_file_loads(llama_dir, tmp_path):
    gguf_util = pytest.importorskip("gguf_util")
    out = tmp_path / "g" / "tiny.gguf"
    out.parent.mkdir()
    gguf_util.write_gguf(llama_dir, out)
    lm = load_model(out)
    assert lm.source_kind == "gguf" and lm.info.n_kv_heads == 2
    ref = load_model(llama_dir)
    import torch
    ids = torch.tensor([ref.tokenize("When Mary and John went").ids])
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, ref.model(input_ids=ids).logits, atol=1e-4)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case, expected", [
    ("missing", "does not exist"),
    ("no_config", "no config.json"),
    ("remote_code", "trust_remote_code"),
    ("truncated", "truncated"),
    ("corrupt_header", "corrupt"),
    ("no_tokenizer", "no tokenizer"),
    ("no_weights", "no weights"),
    ("not_gguf_file", "not a .gguf"),
    ("bad_dtype", "unknown dtype"),
    ("no_cuda", "no usable CUDA"),
    ("bad_json", "not valid JSON"),
])
def test_bad_input_messages(case, expected, gpt2_dir, tmp_path):
    folder = _copy(gpt2_dir, tmp_path / "m")
    kwargs = {}
    path = folder
    weights = folder / "model.safetensors"
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "no_config":
        (folder / "config.json").unlink()
    elif case == "remote_code":
        cfg = json.loads((folder / "config.json").read_text())
        cfg["model_type"] = "my_custom_arch"
        cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.MyModel"}
        (folder / "config.json").write_text(json.dumps(cfg))
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "corrupt_header":
        weights.write_bytes(b"\xff" * 64)
    elif case == "no_tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif case == "no_weights":
        weights.unlink()
    elif case == "not_gguf_file":
        path = folder / "tokenizer.json"
    elif case == "bad_dtype":
        kwargs["dtype"] = "float8"
    elif case == "no_cuda":
        import torch
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        kwargs["device"] = "cuda"
    elif case == "bad_json":
        (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError) as err:
        load_model(path, **kwargs)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message and message.endswith(".")


def test_unsupported_gguf_architecture(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "odd.gguf"
    w = gguf.GGUFWriter(str(path), "mamba_like_unknown")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "odd.gguf" in str(err.value)


# ---- damaged and hostile files (issue 16): one sentence naming the file, never a traceback -----------------

def _st_with_header(path, header: dict, data: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


DAMAGED = {
    # safetensors headers that lie
    "st_header_longer_than_file": (lambda f: (f / "model.safetensors").write_bytes((10**6).to_bytes(8, "little")
                                                                                   + b"{}"), "corrupt header"),
    "st_header_not_object": (lambda f: _st_with_header(f / "model.safetensors", [1, 2]), "not a JSON object"),
    "st_shape_disagrees_with_offsets": (lambda f: _st_with_header(
        f / "model.safetensors", {"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 16]}}, bytes(16)),
        "shape [4, 4]"),
    "st_tensors_overlap": (lambda f: _st_with_header(
        f / "model.safetensors", {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                                  "b": {"dtype": "F32", "shape": [4], "data_offsets": [8, 24]}}, bytes(24)), "overlap"),
    "st_offsets_past_end": (lambda f: _st_with_header(
        f / "model.safetensors", {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}, bytes(16)),
        "truncated"),
    "st_dtype_not_text": (lambda f: _st_with_header(
        f / "model.safetensors", {"w": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, bytes(4)), "dtype"),
    "st_negative_offsets": (lambda f: _st_with_header(
        f / "model.safetensors", {"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, bytes(8)),
        "data_offsets"),
    # index.json
    "index_not_json": (lambda f: (f / "model.safetensors.index.json").write_text("{oops"), "not valid JSON"),
    "index_without_weight_map": (lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}'),
                                 "weight_map"),
    "index_weight_map_not_object": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": ["model.safetensors"]}'), "weight_map"),
    "index_shard_outside_folder": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "../../etc/passwd"}}'), "outside the model folder"),
    "index_shard_missing": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": "model-00002-of-00002.safetensors"}}'), "missing"),
    "index_shard_not_text": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": {"w": 3}}'), "not a file name"),
    # config.json with wrong types
    "config_layers_text": (lambda f: _edit_json(f / "config.json", lambda c: c.update(n_layer="two")), "n_layer"),
    "config_width_negative": (lambda f: _edit_json(f / "config.json", lambda c: c.update(n_embd=-32)), "n_embd"),
    "config_heads_zero": (lambda f: _edit_json(f / "config.json", lambda c: c.update(n_head=0)), "n_head"),
    "config_heads_do_not_divide": (lambda f: _edit_json(f / "config.json", lambda c: c.update(n_head=5)),
                                   "does not divide"),
    "config_architectures_text": (lambda f: _edit_json(f / "config.json", lambda c: c.update(architectures="GPT2")),
                                  "architectures"),
    "config_eps_text": (lambda f: _edit_json(f / "config.json", lambda c: c.update(layer_norm_epsilon="small")),
                        "layer_norm_epsilon"),
    "config_model_type_number": (lambda f: _edit_json(f / "config.json", lambda c: c.update(model_type=2)),
                                 "model_type"),
    "config_not_object": (lambda f: (f / "config.json").write_text("[1, 2]"), "JSON object"),
    "config_deep": (lambda f: (f / "config.json").write_text("[" * 50_000 + "]" * 50_000), "levels deep"),
    # tokenizer
    "tokenizer_config_not_json": (lambda f: (f / "tokenizer_config.json").write_text("{,}"), "tokenizer_config.json"),
    "tokenizer_config_not_object": (lambda f: (f / "tokenizer_config.json").write_text('"text"'), "JSON object"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_model_files_are_one_sentence(case, gpt2_dir, tmp_path):
    folder = _copy(gpt2_dir, tmp_path / "m")
    damage, expected = DAMAGED[case]
    damage(folder)
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    message = str(err.value)
    assert expected in message, message
    assert str(folder) in message and "\n" not in message and message.endswith("."), message


def _pickled_bin_folder(gpt2_dir, tmp_path, payload: bytes):
    folder = _copy(gpt2_dir, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(payload)
    return folder


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("kind", ["bare_pickle", "torch_zip_calling_os_system", "not_a_weights_file"])
def test_a_pickled_bin_is_refused_without_unpickling_advice(kind, gpt2_dir, tmp_path):
    import io
    import pickle

    import torch

    if kind == "bare_pickle":
        payload = pickle.dumps({"w": [1.0, 2.0]})
    elif kind == "torch_zip_calling_os_system":
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(2), "evil": _Evil()}, buf)
        payload = buf.getvalue()
    else:
        payload = b"\x00" * 64
    folder = _pickled_bin_folder(gpt2_dir, tmp_path, payload)
    with pytest.raises(ModelLoadError) as err:
        load_model(folder)
    message = str(err.value)
    assert "pytorch_model.bin" in message and "\n" not in message and message.endswith(".")
    assert "weights_only" not in message and "unpickle it" not in message.lower()
    if kind == "torch_zip_calling_os_system":
        assert "system" in message and "never loaded" in message


def test_a_plain_torch_state_dict_bin_passes_the_check(gpt2_dir, tmp_path):
    import io

    import torch
    from safetensors.torch import load_file

    from desktop_app.engine.file_checks import pytorch_bin_problem

    buf = io.BytesIO()
    torch.save(load_file(str(gpt2_dir / "model.safetensors")), buf)
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(buf.getvalue())
    assert pytorch_bin_problem(path) is None


def test_truncated_gguf_headers_are_one_sentence(llama_dir, tmp_path):
    gguf_util = pytest.importorskip("gguf_util")
    good = tmp_path / "good.gguf"
    gguf_util.write_gguf(llama_dir, good)
    data = good.read_bytes()
    from desktop_app.engine.file_checks import gguf_problem

    assert gguf_problem(good) is None
    cuts = [0, 3, 10, 23, 40, 200, 2000, len(data) // 2, len(data) - 1]
    refused = 0
    for cut in cuts:
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError) as err:
            load_model(bad)
        message = str(err.value)
        assert bad.name in message and "\n" not in message and message.endswith("."), message
        refused += 1
    assert refused == len(cuts)
    lying = bytearray(data)
    lying[16:24] = (2**62).to_bytes(8, "little")  # a metadata count no file could hold
    (tmp_path / "lying.gguf").write_bytes(bytes(lying))
    with pytest.raises(ModelLoadError, match="corrupt header"):
        load_model(tmp_path / "lying.gguf")


def test_library_errors_never_advise_unpickling():
    from desktop_app.engine.file_checks import loader_error_text

    text = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
            "succeed, but it can result in arbitrary code execution.")
    assert "weights_only" not in loader_error_text(text) and "False" not in loader_error_text(text)
    assert loader_error_text("shape mismatch") == "shape mismatch"
