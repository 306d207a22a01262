"""Write a float32 GGUF file from a tiny Hugging Face model folder (Llama or GPT-2), for loader tests.

Follows llama.cpp's conventions, which transformers' GGUF loader undoes: tensor names from gguf-py's
tensor name map, Llama q/k rows permuted for llama.cpp's rotary layout, GPT-2 Conv1D weights transposed to
[out, in], no output tensor when the embeddings are tied, and the byte-level BPE vocabulary stored as
`tokenizer.ggml.*` metadata.
"""

import json
from pathlib import Path

import numpy as np

TOKEN_NORMAL, TOKEN_CONTROL = 1, 3


def write_gguf(model_dir, out_path) -> Path:
    import gguf
    from safetensors.numpy import load_file

    model_dir, out_path = Path(model_dir), Path(out_path)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    weights = load_file(str(model_dir / "model.safetensors"))
    model_type = config["model_type"]
    if model_type == "llama":
        arch, n_layers = gguf.MODEL_ARCH.LLAMA, config["num_hidden_layers"]
    elif model_type == "gpt2":
        arch, n_layers = gguf.MODEL_ARCH.GPT2, config["n_layer"]
    else:
        raise ValueError(f"write_gguf supports llama and gpt2, not {model_type!r}")

    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(model_dir.name)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(n_layers)
    if model_type == "llama":
        _llama_metadata(writer, config)
    else:
        _gpt2_metadata(writer, config)
    _tokenizer_metadata(writer, model_dir, config)

    name_map = gguf.get_tensor_name_map(arch, n_layers)
    for hf_name, value in weights.items():
        base, suffix = hf_name.rsplit(".", 1)
        gguf_base = name_map.get_name(base)
        if gguf_base is None:
            raise ValueError(f"no GGUF name for tensor {hf_name}")
        value = value.astype(np.float32)
        if model_type == "llama" and gguf_base.endswith(".attn_q"):
            value = _rotary_permute(value, config["num_attention_heads"])
        elif model_type == "llama" and gguf_base.endswith(".attn_k"):
            value = _rotary_permute(value, config.get("num_key_value_heads") or config["num_attention_heads"])
        elif model_type == "gpt2" and value.ndim == 2 and gguf_base.split(".")[-1] in _GPT2_CONV1D:
            value = value.T  # HF Conv1D stores [in, out]
        writer.add_tensor(f"{gguf_base}.{suffix}", np.ascontiguousarray(value))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


_GPT2_CONV1D = {"attn_qkv", "attn_output", "ffn_up", "ffn_down"}


def _rotary_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF's rotate-half row order -> llama.cpp's interleaved pairs, per head (the loader applies the inverse)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_metadata(writer, config) -> None:
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or n_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", config.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])


def _gpt2_metadata(writer, config) -> None:
    writer.add_context_length(config["n_positions"])
    writer.add_embedding_length(config["n_embd"])
    writer.add_feed_forward_length(config.get("n_inner") or 4 * config["n_embd"])
    writer.add_head_count(config["n_head"])
    writer.add_layer_norm_eps(config["layer_norm_epsilon"])


def _tokenizer_metadata(writer, model_dir: Path, config) -> None:
    state = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
    model = state["model"]
    if model.get("type") != "BPE":
        raise ValueError("write_gguf needs a byte-level BPE tokenizer.json")
    tokens = [""] * len(model["vocab"])
    for token, index in model["vocab"].items():
        tokens[index] = token
    for added in state.get("added_tokens", []):
        if added["id"] >= len(tokens):
            tokens.extend([""] * (added["id"] + 1 - len(tokens)))
        tokens[added["id"]] = added["content"]
    if len(tokens) != config["vocab_size"]:
        raise ValueError(f"tokenizer has {len(tokens)} tokens but the model's vocab_size is {config['vocab_size']}")
    special = {added["id"] for added in state.get("added_tokens", []) if added.get("special")}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([TOKEN_CONTROL if i in special else TOKEN_NORMAL for i in range(len(tokens))])
    if config.get("bos_token_id") is not None:
        writer.add_bos_token_id(config["bos_token_id"])
    if config.get("eos_token_id") is not None:
        writer.add_eos_token_id(config["eos_token_id"])
    writer.add_add_bos_token(False)
