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
