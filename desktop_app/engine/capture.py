"""Read and write hook points on the real Hugging Face modules.

    with hooks(lm, read=["blocks.0.hook_resid_pre"], write={"blocks.1.attn.hook_z": fn}) as store:
        lm.model(input_ids=ids)
    store["blocks.0.hook_resid_pre"]  # [batch, pos, d_model]

A write function takes the activation (resid/attn_out/mlp_out: [batch, pos, d_model]; hook_z:
[batch, pos, n_heads, d_head]) and returns its replacement of the same shape. Every torch hook is removed
when the block ends, also on error and on cancel.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from desktop_app.engine.adapters import block_output_tensor, replace_block_output
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import BLOCK_KINDS, EMBED, parse_hook_name
from desktop_app.engine.jobs import CancelToken

WriteFn = Callable[[torch.Tensor], torch.Tensor]


def _first_tensor(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, new):
    if isinstance(output, tuple):
        return (new,) + output[1:]
    if isinstance(output, list):
        return [new] + output[1:]
    return new


class _Registrar:
    def __init__(self, lm, store: dict, keep_graph: bool, to_cpu: bool):
        self.lm = lm
        self.a = lm.adapter
        self.store = store
        self.keep_graph = keep_graph
        self.to_cpu = to_cpu
        self.handles: list = []
        self.scratch: dict = {}  # per forward: resid_pre of each layer, for resid_mid
        self.scratch_hooked: set = set()

    def keep(self, name: str, t: torch.Tensor) -> None:
        if not self.keep_graph:
            t = t.detach()
            t = t.cpu() if self.to_cpu else t.clone()
        self.store[name] = t

    def add(self, name: str, write: WriteFn | None) -> None:
        layer, kind = parse_hook_name(name)
        if layer is not None and not 0 <= layer < self.lm.info.n_layers:
            raise SpecError(f"hook point {name} is out of range: this model has layers 0-{self.lm.info.n_layers - 1}.")
        getattr(self, "_" + kind.replace(".", "_"))(name, layer, write)

    # one method per hook kind ---------------------------------------------------------------------------
    def _output_hook(self, module, name, write, get=_first_tensor, put=_replace_first):
        def hook(_mod, _inp, output):
            act = get(output)
            if write is not None:
                act = write(act)
                # a kept graph stores `act` itself: the model gets a copy, since some blocks add to a sub-layer's
                # output in place (Falcon's parallel block: mlp_output += attention_output)
                output = put(output, act.clone() if self.keep_graph else act)
            if write is None or name in self.reads:
                self.keep(name, act)
            return output if write is not None else None
        self.handles.append(module.register_forward_hook(hook))

    def _hook_embed(self, name, _layer, write):
        self._output_hook(self.a.embed, name, write)

    def _ln_final_hook_normalized(self, name, _layer, write):
        if not self.a.final_norm_in_model:
            raise SpecError(f"{name} does not exist: this model has no final norm; use the last block's resid_post.")
        self._output_hook(self.a.final_norm, name, write)

    def _resid_post(self, name, layer, write):
        self._output_hook(self.a.blocks[layer], name, write, block_output_tensor, replace_block_output)

    def _attn_out(self, name, layer, write):
        self._sublayer_hook(self.a.attn_out_module(layer), name, layer, write)

    def _mlp_out(self, name, layer, write):
        self._sublayer_hook(self.a.mlp_out_module(layer), name, layer, write)

    def _sublayer_hook(self, module, name, layer, write):
        """attn_out / mlp_out: the sub-module's output as added to the residual stream, i.e. times the residual
        multiplier (Granite), and back in [batch, pos, d] where the block flattens the tokens (OPT's MLP)."""
        get, put = self._sublayer_view(layer)
        self._output_hook(module, name, write, get, put)

    def _sublayer_view(self, layer):
        m = self.a.residual_multiplier
        key = ("shape", layer)
        if key not in self.scratch_hooked:
            self.scratch_hooked.add(key)

            def remember(_mod, args, kwargs):
                hidden = args[0] if args else kwargs["hidden_states"]
                self.scratch[key] = hidden.shape[:-1]
            self.handles.append(self.a.blocks[layer].register_forward_pre_hook(remember, with_kwargs=True))

        def get(output):
            act = _first_tensor(output)
            if act.dim() == 2:
                act = act.view(*self.scratch[key], act.shape[-1])
            return act * m if m != 1.0 else act

        def put(output, new):
            old = _first_tensor(output)
            new = new / m if m != 1.0 else new
            return _replace_first(output, new.reshape(old.shape))
        return get, put

    def _resid_pre(self, name, layer, write):
        def hook(_mod, args, kwargs):
            if args:
                act = args[0]
            else:
                act = kwargs["hidden_states"]
            if write is not None:
                act = write(act)
                if args:
                    args = (act,) + tuple(args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": act}
            if write is None or name in self.reads:
                self.keep(name, act)
            return (args, kwargs) if write is not None else None
        self.handles.append(self.a.blocks[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def _resid_mid(self, name, layer, write):
        if self.a.parallel_attn_mlp:
            raise SpecError(f"{name} does not exist: this model adds attention and MLP in parallel "
                            "(no residual stream between them); use resid_pre or resid_post.")

        def remember_pre(_mod, args, kwargs):
            self.scratch[layer] = args[0] if args else kwargs["hidden_states"]

        get, put = self._sublayer_view(layer)

        def hook(_mod, _inp, output):
            pre = self.scratch[layer]
            mid = pre + get(output)
            if write is not None:
                mid = write(mid)
                output = put(output, mid - pre)
            if write is None or name in self.reads:
                self.keep(name, mid)
            return output if write is not None else None
        self.handles.append(self.a.blocks[layer].register_forward_pre_hook(remember_pre, with_kwargs=True))
        self.handles.append(self.a.attn_out_module(layer).register_forward_hook(hook))

    def _attn_hook_z(self, name, layer, write):
        n_heads = self.lm.info.n_heads

        def hook(_mod, args):
            flat = args[0]
            z = flat.view(*flat.shape[:-1], n_heads, flat.shape[-1] // n_heads)
            if write is not None:
                z = write(z)
            if write is None or name in self.reads:
                self.keep(name, z)
            if write is not None:
                return (z.reshape(flat.shape),) + tuple(args[1:])
            return None
        self.handles.append(self.a.o_proj(layer).register_forward_pre_hook(hook))

    def _attn_hook_pattern(self, name, layer, write):
        if write is not None:
            raise SpecError(f"{name} can be read but not written; patch attn.hook_z (head_out) instead.")

        def hook(_mod, _inp, output):
            weights = output[1] if isinstance(output, (tuple, list)) and len(output) > 1 else None
            if weights is None:
                raise SpecError("attention patterns need eager attention; reload the model (the loader uses eager).")
            self.keep(name, weights)
        self.handles.append(self.a.attn(layer).register_forward_hook(hook))


@contextlib.contextmanager
def hooks(lm, read=(), write: dict[str, WriteFn] | None = None, cancel: CancelToken | None = None,
          keep_graph: bool = False, to_cpu: bool = False):
    """Attach read and write hooks for one `with` block. `store` maps each read hook name to its activation
    (detached copies unless keep_graph; moved to the CPU if to_cpu)."""
    store: dict[str, torch.Tensor] = {}
    reg = _Registrar(lm, store, keep_graph, to_cpu)
    write = dict(write or {})
    reg.reads = set(read)
    try:
        if cancel is not None:
            def check(_mod, _args):
                cancel.check()
            for block in lm.adapter.blocks:
                reg.handles.append(block.register_forward_pre_hook(check))
        # in forward order, so that a resid_mid write sees this layer's resid_pre after its own write
        for name in sorted(write, key=_forward_order):
            reg.add(name, write[name])
        for name in read:
            if name not in write:
                reg.add(name, None)
        yield store
    finally:
        for h in reg.handles:
            h.remove()
        reg.scratch.clear()


def _forward_order(name: str):
    layer, kind = parse_hook_name(name)
    if layer is None:
        return (-1 if kind == EMBED else 1 << 30, 0)
    return (layer, BLOCK_KINDS.index(kind))


def forward_logits(lm, input_ids: torch.Tensor, last_only: bool = False) -> torch.Tensor:
    """Logits [batch, pos, vocab] of a plain forward pass (no KV cache); with last_only, [batch, 1, vocab]
    and the unembedding is computed for the last position alone."""
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    extra = {"logits_to_keep": 1} if last_only else {}
    try:
        return lm.model(input_ids=input_ids.to(lm.input_device), use_cache=False, **extra).logits
    except TypeError:
        if not extra:
            raise
        return lm.model(input_ids=input_ids.to(lm.input_device), use_cache=False).logits[:, -1:]


def as_ids(ids) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    return t.unsqueeze(0) if t.dim() == 1 else t


def run_with_cache(lm, input_ids, names, cancel: CancelToken | None = None):
    """One forward pass in inference mode capturing `names` to the CPU: (logits [batch, pos, vocab] float32
    on the CPU, {name: activation})."""
    with torch.inference_mode(), hooks(lm, read=list(names), cancel=cancel, to_cpu=True) as store:
        logits = forward_logits(lm, as_ids(input_ids))
    return logits.float().cpu(), dict(store)
