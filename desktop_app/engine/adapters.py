"""Where each hook point lives in a Hugging Face model, per architecture family.

An adapter finds the real modules (decoder blocks, attention, its output projection, MLP, final norm,
unembedding) so that hook points can be attached to them. GPT-2, GPT-NeoX and the Llama-like family
(Llama, Mistral, Qwen2/3, Gemma/Gemma2/3, Phi-3, ...) are named; anything else goes through a search by
common attribute names.
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
           "model.decoder.embed_tokens", "transformer.embed_tokens")
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.language_model.norm",
                "model.decoder.final_layer_norm", "transformer.norm")
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

    def attn(self, layer: int) -> nn.Module:
        return _first(self.blocks[layer], _ATTNS)

    def o_proj(self, layer: int) -> nn.Module:
        return _first(self.attn(layer), _O_PROJS)

    def mlp(self, layer: int) -> nn.Module:
        return _first(self.blocks[layer], _MLPS)

    def attn_out_module(self, layer: int) -> nn.Module:
        """The module whose output is added to the residual stream as the attention output."""
        if self.post_attn_norm_name:
            return getattr(self.blocks[layer], self.post_attn_norm_name)
        return self.attn(layer)

    def mlp_out_module(self, layer: int) -> nn.Module:
        if self.post_mlp_norm_name:
            return getattr(self.blocks[layer], self.post_mlp_norm_name)
        return self.mlp(layer)

    def logits_from_resid(self, resid_final: torch.Tensor) -> torch.Tensor:
        """Final norm and unembedding of a residual stream (any leading dims), as the model's head does."""
        device = next(self.final_norm.parameters(), resid_final).device
        logits = self.unembed(self.final_norm(resid_final.to(device)))
        if self.final_logit_softcap:
            cap = self.final_logit_softcap
            logits = torch.tanh(logits / cap) * cap
        return logits


def make_adapter(model: nn.Module) -> Adapter:
    config = model.config
    model_type = getattr(config, "model_type", "")
    blocks = _first(model, _BLOCK_LISTS)
    embed = _first(model, _EMBEDS)
    final_norm = _first(model, _FINAL_NORMS)
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if blocks is None or embed is None or final_norm is None or unembed is None:
        raise ModelLoadError(
            f"Interp Workbench does not know where the layers of a {model_type or type(model).__name__} model are; "
            "supported are GPT-2, GPT-NeoX and Llama-like decoder models.")
    if model_type == "gpt2":
        family = "gpt2"
    elif model_type == "gpt_neox":
        family = "gpt_neox"
    elif _get(blocks[0], "self_attn.o_proj") is not None and _get(blocks[0], "mlp") is not None:
        family = "llama_like"
    else:
        family = "generic"
    attn0 = _first(blocks[0], _ATTNS)
    if attn0 is None or _first(attn0, _O_PROJS) is None or _first(blocks[0], _MLPS) is None:
        raise ModelLoadError(
            f"the decoder blocks of this {model_type} model have no recognisable attention output projection or MLP; "
            "this architecture is not supported yet.")
    parallel = bool(getattr(config, "use_parallel_residual", False)) if family == "gpt_neox" else \
        bool(getattr(config, "parallel_attn", False))
    has_post_norms = hasattr(blocks[0], "post_feedforward_layernorm") and hasattr(blocks[0], "pre_feedforward_layernorm")
    return Adapter(
        family=family,
        model=model,
        blocks=blocks,
        embed=embed,
        final_norm=final_norm,
        unembed=unembed,
        parallel_attn_mlp=parallel,
        post_attn_norm_name="post_attention_layernorm" if has_post_norms else None,
        post_mlp_norm_name="post_feedforward_layernorm" if has_post_norms else None,
        final_logit_softcap=getattr(config, "final_logit_softcapping", None) or None,
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
