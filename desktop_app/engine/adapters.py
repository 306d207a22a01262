"""Where each hook point lives in a Hugging Face model, per architecture family.

An adapter finds the real modules (decoder blocks, attention, its output projection, MLP, final norm,
unembedding) so that hook points can be attached to them. The families in `FAMILIES` were each read off
transformers' own modelling code (block form, post-norms, residual and logit scaling, where the sub-layer
outputs are added to the residual); anything else goes through a search by common attribute names and must
pass the load-time conformance check (`conformance.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from desktop_app.engine.errors import ModelLoadError


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first(obj, candidates: tuple[str, ...]):
    for name in candidates:
        found = _get(obj, name)
        if found is not None:
            return found
    return None


_BLOCK_LISTS = ("model.layers", "transformer.h", "gpt_neox.layers", "model.language_model.layers",
                "model.decoder.layers", "transformer.layers", "layers")
_EMBEDS = ("model.embed_tokens", "transformer.wte", "gpt_neox.embed_in", "model.language_model.embed_tokens",
           "model.decoder.embed_tokens", "transformer.embed_tokens", "transformer.word_embeddings")
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.language_model.norm",
                "model.decoder.final_layer_norm", "transformer.norm", "model.final_layernorm")
_ATTNS = ("self_attn", "attn", "attention", "self_attention")
_O_PROJS = ("o_proj", "c_proj", "dense", "out_proj", "wo")
_MLPS = ("mlp", "feed_forward", "ffn")


@dataclass
class Adapter:
    family: str
    model: nn.Module
    blocks: nn.ModuleList
    embed: nn.Module
    final_norm: nn.Module
    unembed: nn.Module
    parallel_attn_mlp: bool
    post_attn_norm_name: str | None = None  # Gemma2/3: attn_out is read after this norm
    post_mlp_norm_name: str | None = None
    final_logit_softcap: float | None = None
    logit_scale: float = 1.0  # Cohere multiplies its logits, Granite divides them (1 / logits_scaling)
    residual_multiplier: float = 1.0  # Granite: block output = residual + multiplier * sub-layer output
    attn_out_path: str | None = None  # the module whose output is attn_out, inside the block (Bloom: the dense)
    mlp_out_path: str | None = None
    final_proj: nn.Module | None = None  # OPT-350m: a projection between the final residual and the unembedding
    final_norm_in_model: bool = True  # False where the model has no final norm (an identity stands in)

    def attn(self, layer: int) -> nn.Module:
        return _first(self.blocks[layer], _ATTNS)

    def o_proj(self, layer: int) -> nn.Module:
        return _first(self.attn(layer), _O_PROJS)

    def mlp(self, layer: int) -> nn.Module:
        return _first(self.blocks[layer], _MLPS)

    def attn_out_module(self, layer: int) -> nn.Module:
        """The module whose output (times residual_multiplier) is added to the residual stream as attn_out."""
        if self.attn_out_path:
            return _get(self.blocks[layer], self.attn_out_path)
        if self.post_attn_norm_name:
            return getattr(self.blocks[layer], self.post_attn_norm_name)
        return self.attn(layer)

    def mlp_out_module(self, layer: int) -> nn.Module:
        if self.mlp_out_path:
            return _get(self.blocks[layer], self.mlp_out_path)
        if self.post_mlp_norm_name:
            return getattr(self.blocks[layer], self.post_mlp_norm_name)
        return self.mlp(layer)

    def attn_out_from_o_proj_input(self, layer: int, z_flat: torch.Tensor) -> torch.Tensor:
        """attn_out computed from the output projection's input (hook_z flattened over heads)."""
        out = block_output_tensor(self.o_proj(layer)(z_flat))
        if self.post_attn_norm_name and not self.attn_out_path:
            out = getattr(self.blocks[layer], self.post_attn_norm_name)(out)
        return out * self.residual_multiplier

    def logits_from_resid(self, resid_final: torch.Tensor, columns: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm and unembedding of a residual stream (any leading dims), as the model's head does. With
        `columns` (token ids), the logits of those tokens only, from the unembedding's rows of them (the caller
        checks that the unembedding is a plain linear layer)."""
        device = next(self.final_norm.parameters(), resid_final).device
        normed = self.final_norm(resid_final.to(device))
        if self.final_proj is not None:
            normed = self.final_proj(normed)
        if columns is None:
            logits = self.unembed(normed)
        else:
            weight, bias = self.unembed.weight, self.unembed.bias
            cols = columns.to(weight.device)
            logits = torch.nn.functional.linear(normed.to(weight.device), weight[cols],
                                                None if bias is None else bias[cols])
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.final_logit_softcap:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


def _cfg(config, name, default=None):
    value = getattr(config, name, None)
    return default if value is None else value


# Per family, from transformers' modelling code: whether attention and MLP read the same input (parallel block),
# post-norms, and where attn_out / mlp_out are read when the sub-module adds the residual itself (Bloom) or the
# MLP has no module of its own (OPT).
_POST_NORMS = ("post_attention_layernorm", "post_feedforward_layernorm")
FAMILIES = {
    "gpt2": {}, "llama": {}, "mistral": {}, "mixtral": {}, "qwen2": {}, "qwen2_moe": {}, "qwen3": {},
    "qwen3_moe": {}, "gemma": {}, "phi3": {}, "olmoe": {},
    "gpt_neox": {"parallel": lambda c: bool(_cfg(c, "use_parallel_residual", True))},
    "stablelm": {"parallel": lambda c: bool(_cfg(c, "use_parallel_residual", False))},
    "gptj": {"parallel": lambda c: True},
    "phi": {"parallel": lambda c: True},
    "cohere": {"parallel": lambda c: True, "logit_scale": lambda c: float(_cfg(c, "logit_scale", 1.0))},
    "falcon": {"parallel": lambda c: bool(_cfg(c, "parallel_attn", False) or _cfg(c, "new_decoder_architecture", False))},
    "granite": {"logit_scale": lambda c: 1.0 / float(_cfg(c, "logits_scaling", 1.0)),
                "residual_multiplier": lambda c: float(_cfg(c, "residual_multiplier", 1.0))},
    "gemma2": {"post_norms": _POST_NORMS}, "gemma3_text": {"post_norms": _POST_NORMS},
    # Gemma3ForConditionalGeneration (multimodal checkpoints) does not soft-cap its logits; Gemma3ForCausalLM does
    "gemma3": {"post_norms": _POST_NORMS, "softcap": lambda c: None}, "olmo2": {"post_norms": _POST_NORMS},
    # BloomAttention and BloomMLP add the residual themselves: read their last projection instead
    "bloom": {"attn_out_path": "self_attention.dense", "mlp_out_path": "mlp.dense_4h_to_h"},
    "opt": {"mlp_out_path": "fc2"},  # OPT's MLP is fc1 / activation / fc2 directly in the block
}


def make_adapter(model: nn.Module) -> Adapter:
    config = model.config
    model_type = getattr(config, "model_type", "")
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    blocks = _first(model, _BLOCK_LISTS)
    embed = _first(model, _EMBEDS)
    final_norm = _first(model, _FINAL_NORMS)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    final_proj, final_norm_in_model = None, True
    if model_type == "opt":  # OPTDecoder: final_layer_norm only with pre-norm layers, then project_out if any
        final_proj = _get(model, "model.decoder.project_out")
        if final_norm is None:
            final_norm, final_norm_in_model = nn.Identity(), False
    if blocks is None or embed is None or final_norm is None or unembed is None:
        raise ModelLoadError(
            f"Interp Workbench does not know where the layers of a {model_type or type(model).__name__} model are; "
            "supported are GPT-2, GPT-NeoX, GPT-J, OPT, Bloom, Falcon, Phi and Llama-like decoder models.")
    is_known = model_type in FAMILIES
    family = model_type if is_known else "generic"
    known = FAMILIES.get(model_type, {})
    attn0 = _first(blocks[0], _ATTNS)
    has_mlp = known.get("mlp_out_path") or _first(blocks[0], _MLPS) is not None
    if attn0 is None or _first(attn0, _O_PROJS) is None or not has_mlp:
        raise ModelLoadError(
            f"the decoder blocks of this {model_type} model have no recognisable attention output projection or MLP; "
            "this architecture is not supported yet.")
    if is_known:
        parallel = known.get("parallel", lambda c: False)(text_config)
        post_norms = known.get("post_norms")
    else:  # a guess, which the conformance check confirms or refutes
        parallel = bool(_cfg(text_config, "use_parallel_residual", False) or _cfg(text_config, "parallel_attn", False))
        post_norms = _POST_NORMS if all(hasattr(blocks[0], n) for n in _POST_NORMS) else None
    return Adapter(
        family=family,
        model=model,
        blocks=blocks,
        embed=embed,
        final_norm=final_norm,
        unembed=unembed,
        parallel_attn_mlp=parallel,
        post_attn_norm_name=post_norms[0] if post_norms else None,
        post_mlp_norm_name=post_norms[1] if post_norms else None,
        final_logit_softcap=known.get("softcap", lambda c: _cfg(c, "final_logit_softcapping"))(text_config) or None,
        logit_scale=known.get("logit_scale", lambda c: 1.0)(text_config),
        residual_multiplier=known.get("residual_multiplier", lambda c: 1.0)(text_config),
        attn_out_path=known.get("attn_out_path"),
        mlp_out_path=known.get("mlp_out_path"),
        final_proj=final_proj,
        final_norm_in_model=final_norm_in_model,
    )


def block_output_tensor(output):
    """Decoder blocks return a tensor (transformers 5) or a tuple whose first item is the hidden state."""
    return output[0] if isinstance(output, (tuple, list)) else output


def replace_block_output(output, new: torch.Tensor):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new
