"""Record a run once, then restart it from any layer for a whole batch of patched variants.

A patch at layer L leaves layers 0..L-1 untouched, so a sweep does not recompute them: `record_run` keeps each
block's input (resid_pre) and the keyword arguments the model passed to it (attention mask, rotary
embeddings, position ids); `run_from_layer` feeds a batch of hidden states into block L with those same
arguments (batch 1, broadcast over the batch) and runs to the end, reading logits only at the last position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from desktop_app.engine.adapters import block_output_tensor
from desktop_app.engine.capture import as_ids, hooks
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken


@dataclass
class RecordedRun:
    ids: torch.Tensor  # [1, pos]
    logits_last: torch.Tensor  # [vocab], float32, CPU
    resid_pre: list[torch.Tensor]  # per layer [1, pos, d_model] on the block's device
    block_kwargs: list[dict]
    block_args: list[tuple]  # positional arguments after the hidden state (GPT-2 passes its mask this way)
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer (keys, values) [1, kv_heads, pos, d]
    acts: dict[str, torch.Tensor] = field(default_factory=dict)  # extra hook points, on the model's devices

    @property
    def n_pos(self) -> int:
        return self.ids.shape[1]

    def resid_post(self, layer: int) -> torch.Tensor:
        if layer + 1 < len(self.resid_pre):
            return self.resid_pre[layer + 1]
        return self.acts[hook_name(layer, "resid_post")]


def record_run(lm, ids, extra_reads=(), cancel: CancelToken | None = None) -> RecordedRun:
    """One forward pass of a single prompt keeping what a restart from any layer needs."""
    blocks = lm.adapter.blocks
    kwargs_per_block: list[dict] = [dict() for _ in blocks]
    args_per_block: list[tuple] = [() for _ in blocks]
    handles = []

    def keeper(index):
        def hook(_mod, args, kwargs):
            kept = {k: (_CACHE if _is_cache(v) else v) for k, v in kwargs.items() if k != "hidden_states"}
            kept["use_cache"] = False
            kwargs_per_block[index] = kept
            args_per_block[index] = tuple(_CACHE if _is_cache(a) else a for a in args[1:])
        return hook

    last = hook_name(len(blocks) - 1, "resid_post")
    reads = [hook_name(L, "resid_pre") for L in range(len(blocks))] + [last] + list(extra_reads)
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(keeper(i), with_kwargs=True))
        with torch.inference_mode(), hooks(lm, read=reads, cancel=cancel) as store:
            # with a KV cache, so that a restart can reuse the keys and values of the positions before a patch. A
            # DynamicCache made without the config keeps every position on every layer: the model's own cache keeps
            # only the last window of keys on sliding-window layers (Mistral, Gemma 2/3, Phi-3, Qwen2 windows).
            ids_in = as_ids(ids).to(lm.input_device)
            try:
                out = lm.model(input_ids=ids_in, use_cache=True, cache=_full_cache())
            except TypeError:  # remote code without transformers' `cache` argument: its own cache, checked below
                out = lm.model(input_ids=ids_in, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    resid = [store.pop(hook_name(L, "resid_pre")) for L in range(len(blocks))]
    acts = dict(store)
    n_pos = as_ids(ids).shape[1]
    return RecordedRun(ids=as_ids(ids), logits_last=out.logits[0, -1].float().cpu(), resid_pre=resid,
                       block_kwargs=kwargs_per_block, block_args=args_per_block, acts=acts,
                       prefix_kv=_cache_tensors(getattr(out, "cache", None), len(blocks), n_pos))


def _full_cache():
    from transformers import DynamicCache

    return DynamicCache()


_CACHE = object()  # where the model passed its KV cache to a block


def _is_cache(obj) -> bool:
    return type(obj).__name__.endswith("Cache")


def _cache_tensors(cache, n_layers: int, n_pos: int):
    """Per layer (keys, values) of a transformers cache, or None when its layout is not the one known here or a
    layer's keys do not cover every position of the prompt (then sweeps restart from position 0)."""
    layers = getattr(cache, "layers", None)
    try:
        kv = [(layers[i].keys, layers[i].values) for i in range(n_layers)]
    except (TypeError, IndexError, AttributeError):
        return None
    ok = all(isinstance(k, torch.Tensor) and k.dim() == 4 and k.shape[-2] == n_pos and v.shape[-2] == n_pos
             for k, v in kv)
    return kv if ok else None


class _PrefixKV:
    """Stands in for a KV cache: each attention layer gets the recorded keys and values of the first `start`
    positions in front of its own (the rows only compute positions from `start` on). Nothing is mutated, so
    one object serves every row and every chunk."""

    def __init__(self, prefix_kv, start: int):
        self.prefix = [(k[:, :, :start], v[:, :, :start]) for k, v in prefix_kv]

    def update(self, keys, values, layer_idx, *args, **kwargs):
        pk, pv = self.prefix[layer_idx]
        rows = keys.shape[0]
        return (torch.cat([pk.to(keys.device, keys.dtype).expand(rows, -1, -1, -1), keys], dim=-2),
                torch.cat([pv.to(values.device, values.dtype).expand(rows, -1, -1, -1), values], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.prefix[layer_idx][0].shape[-2]


def _from_position(value, start: int, n_pos: int):
    """A block argument cut to the positions from `start` on (masks along their query dimension)."""
    if isinstance(value, tuple):
        return tuple(_from_position(v, start, n_pos) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    if value.dim() == 4 and value.shape[-2] == n_pos:  # attention mask [batch, 1, query, key]
        return value[..., start:, :]
    if value.dim() == 1 and value.shape[0] == n_pos:  # cache_position
        return value[start:]
    if value.dim() in (2, 3) and value.shape[1] == n_pos:  # position ids, rotary cos / sin
        return value[:, start:]
    return value


def can_start_later(run: RecordedRun, layer: int) -> bool:
    """Whether blocks from `layer` on can be run on a suffix of the positions (needs the recorded keys and
    values and an explicit attention mask to cut)."""
    if run.prefix_kv is None:
        return False
    for L in range(layer, len(run.block_kwargs)):
        masks = [v for v in list(run.block_kwargs[L].values()) + list(run.block_args[L])
                 if isinstance(v, torch.Tensor) and v.dim() == 4]
        if not masks:
            return False
    return True


def _alibi_rows(alibi, rows: int):
    """ALiBi biases are recorded for batch 1 with the batch folded into their first dimension (Bloom: [batch *
    heads, 1, key]; Falcon: [batch, heads, 1, key]); a batch of `rows` needs them repeated per row. Each depends on
    the key position only, so they need no cut for a restart from a later position (the keys still start at 0)."""
    if not isinstance(alibi, torch.Tensor) or rows == 1:
        return alibi
    if alibi.dim() == 4 and alibi.shape[0] == 1:
        return alibi.expand(rows, *alibi.shape[1:])
    if alibi.dim() == 3:
        return alibi.repeat(rows, 1, 1)
    return alibi


def _block_call(run: RecordedRun, layer: int, start: int, rows: int = 1):
    """(args, kwargs) for block `layer`: the recorded ones, cut to the positions from `start` on with the
    prefix keys and values standing in for the cache (start > 0), or with no cache (start == 0)."""
    cache = _PrefixKV(run.prefix_kv, start) if start > 0 else None
    n_pos = run.n_pos
    args = tuple(cache if a is _CACHE else _from_position(a, start, n_pos) if start else a
                 for a in run.block_args[layer])
    kwargs = {k: cache if v is _CACHE else _alibi_rows(v, rows) if k == "alibi" else
              _from_position(v, start, n_pos) if start else v
              for k, v in run.block_kwargs[layer].items()}
    return args, kwargs


def run_block(run: RecordedRun, lm, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    """Block `layer` alone on `hidden` [batch, pos, d_model] with the recorded arguments: its resid_post."""
    args, kwargs = _block_call(run, layer, 0, rows=hidden.shape[0])
    return block_output_tensor(lm.adapter.blocks[layer](hidden, *args, **kwargs))


def run_from_layer(lm, run: RecordedRun, layer: int, hidden: torch.Tensor, cancel: CancelToken | None = None,
                   last_only: bool = True, start: int = 0, unembed: bool = True) -> torch.Tensor:
    """Feed `hidden` [batch, pos, d_model] into block `layer` and run to the logits. Returns float32 logits
    [batch, vocab] at the last position (or [batch, pos, vocab] if not last_only). Hooks registered by the
    caller (e.g. a write at this layer) apply as in a normal forward pass.

    With start > 0, `hidden` holds only the positions from `start` on: the earlier positions are the recorded
    run's (a patch never changes what comes before it in a causal model), so only their keys and values are
    needed, taken from the recording (check can_start_later first)."""
    blocks = lm.adapter.blocks
    h = hidden
    for L in range(layer, len(blocks)):
        if cancel is not None:
            cancel.check()
        args, kwargs = _block_call(run, L, start, rows=h.shape[0])
        h = block_output_tensor(blocks[L](h, *args, **kwargs))
    if last_only:
        h = h[:, -1]
    return lm.adapter.logits_from_resid(h).float() if unembed else h
