"""The frozen replacement model of an attribution graph: hooks that record the real run, then run the model with its
MLPs replaced by transcoders plus error terms, or frozen (attention patterns, norm scales and MLP outputs fixed).

Freezing the attention patterns and the norms' scales at their values in the real run, and the MLP outputs, makes
the model affine in what the graph's nodes write (the input embeddings and what is added at each MLP output).
Frozen attention runs through a registered transformers attention function that applies the recorded pattern to the
values (so models that dispatch their attention through transformers' AttentionInterface work: GPT-2, Llama, NeoX,
...); frozen norms are hooks returning y0 + J (x - x0) with J the norm's Jacobian at a fixed scale. Models whose
MLP output is post-normed, scaled or read elsewhere are refused.
"""
from __future__ import annotations

import numpy as np
import torch

from desktop_app.engine.dla import FrozenNorm
from desktop_app.engine.errors import SpecError
from desktop_app.engine.transcoders import reads_resid_mid

_ATTN_NAME = "iwb_frozen_pattern"
_PATTERNS: dict[int, torch.Tensor] = {}  # id(attention module) -> recorded pattern [1, heads, query, key]


def _frozen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    pattern = _PATTERNS.get(id(module))
    if pattern is None:
        raise SpecError("internal: frozen attention was asked for a layer whose pattern was not recorded.")
    v = value
    if v.shape[1] != pattern.shape[1]:  # grouped-query attention: each kv head serves several query heads
        v = v.repeat_interleave(pattern.shape[1] // v.shape[1], dim=1)
    out = torch.matmul(pattern.to(v.dtype), v)
    return out.transpose(1, 2).contiguous(), pattern


def _register_attention():
    from transformers.modeling_utils import AttentionInterface

    if _ATTN_NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(_ATTN_NAME, _frozen_attention)


def check_supported(lm, tset) -> None:
    """Refuses (one sentence) a model whose MLP output is not simply added to the residual stream, and a transcoder
    set of another depth or width than the model."""
    a = lm.adapter
    problems = [what for what, bad in (
        ("its MLP output is post-normed", a.post_mlp_norm_name), ("its MLP output is read elsewhere", a.mlp_out_path),
        ("it scales sub-layer outputs", a.residual_multiplier != 1.0),
        ("it caps its logits with tanh", a.final_logit_softcap), ("it has a projection after the final norm",
                                                                   a.final_proj is not None)) if bad]
    if problems:
        raise SpecError(f"attribution graphs are not supported for this {a.family} model: {problems[0]}.")
    if len(tset) != len(a.blocks) or tset.d_model != lm.info.d_model:
        raise SpecError(f"the transcoder set ({len(tset)} layers, d_model {tset.d_model}) does not fit this model "
                        f"({len(a.blocks)} layers, d_model {lm.info.d_model}).")


def check_reproduces(got, real, what: str) -> None:
    """Refuses (one sentence, with the difference) a run that should equal the real model's logits at the prompt and
    does not: the model has a part the frozen / replacement model does not account for."""
    got, real = np.asarray(got, dtype=np.float64), np.asarray(real, dtype=np.float64)
    diff = float(np.abs(got - real).max())
    if not diff <= 1e-4 * (1.0 + float(np.abs(real).max())):
        raise SpecError(f"refused: unedited, {what} does not reproduce the real logits (off by {diff:.2g}), so this "
                        "model cannot be analysed this way.")


def block_norms(lm) -> list[torch.nn.Module]:
    """Every norm of the blocks outside attention and MLP (those see only what is frozen or replaced), and the
    final norm."""
    a = lm.adapter
    found = []
    for L, block in enumerate(a.blocks):
        inner = {id(m) for sub in (a.attn(L), a.mlp(L)) for m in sub.modules()}
        found += [m for m in block.modules() if id(m) not in inner and m is not block
                  and ("Norm" in type(m).__name__ or isinstance(m, torch.nn.LayerNorm))]
    if a.final_norm_in_model:
        found.append(a.final_norm)
    return found


class _NormState:
    def __init__(self, module, x0: torch.Tensor, y0: torch.Tensor):
        fn = FrozenNorm(module, x0.reshape(-1, x0.shape[-1])[0])
        self.x0, self.y0 = x0, y0
        self.centred = fn.centred
        self.gain = fn.gain.float()
        eps = next((float(getattr(module, n)) for n in ("eps", "variance_epsilon", "epsilon")
                    if isinstance(getattr(module, n, None), (int, float))), 0.0)
        self.scale = torch.sqrt(self._centre(x0).pow(2).mean(-1, keepdim=True) + eps)
        rebuilt = self.gain * self._centre(x0) / self.scale + fn.bias.float()
        diff = float((rebuilt - y0).abs().max())
        if diff > 1e-4 * (1.0 + float(y0.abs().max())):
            raise SpecError(f"refused: the norm {type(module).__name__} is not a scaled LayerNorm / RMSNorm "
                            f"(rebuilding it with a frozen scale is off by {diff:.2g}).")

    def _centre(self, v):
        return v - v.mean(-1, keepdim=True) if self.centred else v

    def __call__(self, x):
        if x.dim() == self.x0.dim() - 1:  # the final norm on the last position only (run_from_layer last_only)
            x0, y0, scale = self.x0[:, -1], self.y0[:, -1], self.scale[:, -1]
        else:
            x0, y0, scale = self.x0, self.y0, self.scale
        return y0 + self.gain * self._centre(x - x0) / scale


class ReplacementContext:
    """Hooks for the three ways this module runs the model: `record` (the real run, keeping what is frozen),
    `replacement` (real attention and norms, MLPs replaced by transcoder + error), `frozen` (patterns, norm
    scales and MLP outputs fixed: affine in the embeddings and the injected MLP outputs).

    With gradient_only, frozen mode serves only the edges' backward passes, whose MLP outputs are replaced whatever
    the MLPs compute: the MLPs are not run (or run without autograd), and a fused query/key/value projection keeps
    only its value columns in the autograd graph. Subclasses that read the real MLPs in frozen mode leave it off."""

    def __init__(self, lm, tset, gradient_only: bool = False):
        self.lm, self.tset, self.a = lm, tset, lm.adapter
        self.gradient_only = gradient_only
        self.mode = "record"
        self.norms = block_norms(lm)
        self.norm_io: dict[int, tuple] = {}
        self.norm_states: dict[int, _NormState] = {}
        self.patterns: dict[int, torch.Tensor] = {}
        self.mlp_in0: list = [None] * len(self.a.blocks)
        self.mlp_out0: list = [None] * len(self.a.blocks)
        self.mlp_in: list = [None] * len(self.a.blocks)
        self.mlp_inject: list = [None] * len(self.a.blocks)  # frozen: what the MLP writes besides W_skip x
        self.errors: list = [None] * len(self.a.blocks)
        self.mlp_plain: list = [False] * len(self.a.blocks)  # the MLP returns a plain tensor
        self.acts: list = [None] * len(self.a.blocks)  # replacement: each layer's feature activations in this run
        self.handles = []
        self.configs = []
        self.skipped: list[torch.nn.Module] = []
        # transcoders reading hook_resid_mid: each layer's MLP norm (found in the recording as the norm whose output is
        # the MLP's input); the transcoders read that norm's input in every run
        self.reads_mid = reads_resid_mid(tset)
        if self.reads_mid:
            check_resid_mid(lm)
        self.mid_norm: list = [None] * len(self.a.blocks)
        self.norm_in: dict[int, torch.Tensor] = {}

    def __enter__(self):
        for m in self.norms:
            self.handles.append(m.register_forward_hook(self._norm_hook))
        self.grad_at_enter = self.grad_enabled = torch.is_grad_enabled()
        for L in range(len(self.a.blocks)):
            if self.gradient_only:
                self.handles.append(self.a.mlp(L).register_forward_pre_hook(self._mlp_pre_hook))
            self.handles.append(self.a.mlp(L).register_forward_hook(self._mlp_hook(L)))
            self.handles.append(self.a.attn(L).register_forward_hook(self._attn_hook))
            qkv = _fused_qkv(self.a.attn(L)) if self.gradient_only else None
            if qkv is not None:
                self.handles.append(qkv.register_forward_hook(self._value_only_hook))
        return self

    def __exit__(self, *exc):
        torch.set_grad_enabled(self.grad_at_enter)  # an error inside a frozen MLP left autograd off
        self._skip_mlps(False)
        for h in self.handles:
            h.remove()
        self._attention("restore")
        for m in list(_PATTERNS):
            if m in self.patterns:
                _PATTERNS.pop(m, None)

    def _attention(self, what: str):
        if what == "freeze":
            _register_attention()
            _PATTERNS.update(self.patterns)
            for L in range(len(self.a.blocks)):
                cfg = getattr(self.a.attn(L), "config", None)
                if cfg is not None and all(cfg is not c for c, _ in self.configs):
                    self.configs.append((cfg, cfg._attn_implementation))
                    cfg._attn_implementation = _ATTN_NAME
        else:
            for cfg, impl in self.configs:
                cfg._attn_implementation = impl
            self.configs = []

    def _norm_hook(self, module, args, output):
        if self.reads_mid:
            self.norm_in[id(module)] = args[0]
        if self.mode == "record":
            self.norm_io[id(module)] = (args[0].detach().clone(), output.detach().clone())
            return None
        if self.mode == "frozen":
            return self.norm_states[id(module)](args[0])
        return None

    def _attn_hook(self, module, args, output):
        if self.mode == "record":
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if weights is None:
                raise SpecError("attribution graphs need eager attention (the pattern of each head); reload the model.")
            self.patterns[id(module)] = weights.detach().clone()
        elif self.mode == "frozen" and not (isinstance(output, (tuple, list)) and len(output) > 1
                                            and output[1] is self.patterns[id(module)]):
            # the attention did not run through transformers' attention interface (custom code): its pattern was
            # computed live, so the model is not affine in what the nodes write and every edge would be wrong
            raise SpecError(f"refused: this {self.a.family} model's attention does not dispatch through transformers' "
                            "attention interface, so its patterns cannot be frozen for a graph or a clamp check.")
        return None

    def _value_only_hook(self, module, args, output):
        # frozen: a fused [query | key | value] projection (GPT-2's c_attn) where only the values reach the output
        # (the pattern is fixed), so only the value columns are kept in the autograd graph: the backward passes
        # then multiply by a third of the weight
        if self.mode != "frozen" or not torch.is_grad_enabled():
            return None
        x = args[0]
        d = output.shape[-1] // 3
        v = torch.addmm(module.bias[2 * d:], x.reshape(-1, x.shape[-1]), module.weight[:, 2 * d:])
        return torch.cat([output[..., :2 * d].detach(), v.reshape(*x.shape[:-1], d).to(output.dtype)], -1)

    def _skip_mlps(self, skip: bool):
        """Frozen: an MLP whose output is a plain tensor is not computed at all (its output is replaced by the hook
        below), its forward stood in for by the identity on the instance; restored when leaving frozen mode."""
        for m in self.skipped:
            m.__dict__.pop("forward", None)
        self.skipped = []
        if skip:
            for L in range(len(self.a.blocks)):
                if self.mlp_plain[L] and "forward" not in self.a.mlp(L).__dict__:
                    self.a.mlp(L).forward = _identity
                    self.skipped.append(self.a.mlp(L))

    def _mlp_pre_hook(self, _mod, args):
        # frozen: the MLP's own output is replaced, so its insides are computed without autograd (no memory kept
        # for a backward pass that never reaches them); the hook below turns autograd back on
        if self.mode == "frozen":
            self.grad_enabled = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
        return None

    def _mlp_hook(self, layer):
        def hook(_mod, args, output):
            x = args[0]
            if self.mode == "frozen" and self.gradient_only:
                torch.set_grad_enabled(self.grad_enabled)
            if self.mode == "record":
                if self.reads_mid:
                    self.mid_norm[layer] = self._find_mlp_norm(layer, x)
                x = self.transcoder_input(layer, x)
                self.mlp_in0[layer] = x.detach().clone()
                self.mlp_out0[layer] = (output[0] if isinstance(output, (tuple, list)) else output).detach().clone()
                self.mlp_plain[layer] = isinstance(output, torch.Tensor)
                return None
            x = self.transcoder_input(layer, x)
            self.mlp_in[layer] = x
            if self.mode == "replacement":
                new = self._replaced(layer, x) + self.errors[layer]
            else:
                new = self.mlp_inject[layer] + skip_of(self.tset, layer, x)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new
        return hook

    def transcoder_input(self, layer: int, mlp_input: torch.Tensor) -> torch.Tensor:
        """What layer `layer`'s transcoder reads in the current run: the MLP's input, or (hook_resid_mid) the input
        of the MLP's norm."""
        return self.norm_in[self.mid_norm[layer]] if self.reads_mid else mlp_input

    def _find_mlp_norm(self, layer: int, mlp_input: torch.Tensor) -> int:
        return find_mlp_norm(self.lm, layer, {i: y for i, (_x, y) in self.norm_io.items()}, mlp_input)

    def _replaced(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """What the transcoders make of layer `layer`'s MLP output. A cross-layer set adds the features read at every
        layer s <= layer (encoded earlier in the same forward pass, layers run in order) decoded into this layer."""
        acts = self.encode(layer, x)
        if not is_cross_layer(self.tset):
            return self.tset.layers[layer].decode(acts, x)
        return self.tset.b_dec[layer] + sum(self.acts[s] @ self.tset.W_dec[s][:, layer - s] for s in range(layer + 1))

    def encode(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer `layer`'s feature activations at its transcoder input x, kept in `acts` for this run."""
        tset = self.tset
        self.acts[layer] = tset.encode(layer, x) if is_cross_layer(tset) else tset.layers[layer].encode(x)
        return self.acts[layer]

    def set_mode(self, mode: str):
        if mode == "frozen" and not self.norm_states:
            self.norm_states = {i: _NormState(m, *self.norm_io[id(m)]) for m in self.norms
                                for i in [id(m)]}
        self._attention("freeze" if mode == "frozen" else "restore")
        self._skip_mlps(mode == "frozen" and self.gradient_only)
        self.mode = mode


def check_resid_mid(lm) -> None:
    """Refuses a model without hook_resid_mid (the residual stream between attention and MLP)."""
    if lm.adapter.parallel_attn_mlp:
        raise SpecError("these transcoders read hook_resid_mid, which this model does not have (its attention and "
                        "MLP run in parallel from the same input).")


def find_mlp_norm(lm, layer: int, norm_outputs: dict, mlp_input: torch.Tensor) -> int:
    """Which of the block norms (by id, with their outputs in the same run) is layer `layer`'s MLP norm: the one of its
    block whose output is the MLP's input. Its input is hook_resid_mid, what transcoders reading that hook take."""
    block = {id(m) for m in lm.adapter.blocks[layer].modules()}
    found = [i for i, y in norm_outputs.items() if i in block and y.shape == mlp_input.shape
             and torch.equal(y, mlp_input)]
    if len(found) != 1:
        raise SpecError(f"these transcoders read hook_resid_mid, but layer {layer}'s MLP input is not the output "
                        "of one norm of its block here, so the residual stream before it cannot be found.")
    return found[0]


def is_cross_layer(tset) -> bool:
    return bool(getattr(tset, "cross_layer", False))


def skip_of(tset, layer: int, x: torch.Tensor) -> torch.Tensor:
    """The linear skip term a layer's transcoder adds (zero for a cross-layer set, which has none)."""
    if is_cross_layer(tset):
        return torch.zeros_like(x[..., :tset.d_model])
    return tset.layers[layer].skip(x)


def width_of(tset, layer: int) -> int:
    """How many features layer `layer` of the set reads."""
    return tset.d_transcoder if is_cross_layer(tset) else tset.layers[layer].d_transcoder


def b_dec_of(tset, layer: int) -> torch.Tensor:
    """The decoder bias written into layer `layer`'s MLP output."""
    return (tset.b_dec[layer] if is_cross_layer(tset) else tset.layers[layer].b_dec).float()


def _identity(x, *args, **kwargs):
    return x


def _fused_qkv(attn: torch.nn.Module):
    """GPT-2's fused projection (a Conv1D `c_attn` with weight [d, 3 d] split into query, key, value thirds), or
    None for attention of another layout."""
    c = getattr(attn, "c_attn", None)
    w = getattr(c, "weight", None)
    if (type(c).__name__ != "Conv1D" or getattr(attn, "is_cross_attention", False) or w is None or w.dim() != 2
            or w.shape[1] != 3 * w.shape[0] or getattr(attn, "split_size", None) != w.shape[0]):
        return None
    return c


def _detached_run(run):
    """The recorded block arguments as ordinary tensors (recorded under inference mode, which autograd refuses)."""
    def copy(v):
        if isinstance(v, torch.Tensor):
            return v.clone()
        if isinstance(v, tuple):
            return tuple(copy(x) for x in v)
        return v
    run.block_kwargs = [{k: copy(v) for k, v in kw.items()} for kw in run.block_kwargs]
    run.block_args = [tuple(copy(v) for v in args) for args in run.block_args]
    run.resid_pre = [r.clone() for r in run.resid_pre]
    return run
