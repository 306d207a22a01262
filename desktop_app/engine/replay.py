"""Record a run once, then restart it from any layer for a whole batch of patched variants.

A patch at layer L leaves layers 0..L-1 untouched, so a sweep does not recompute them: `record_run` keeps each
block's input (resid_pre) and the keyword arguments the model passed to it (attention mask, rotary
embeddings, position ids); `run_from_layer` feeds a batch of hidden states into block L with those same
arguments (batch 1, broadcast over the batch) and runs to the end, reading logits only at the last position.
"""
from __future__ import annotations

import weakref
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


def _from_position(value, start: int, n_pos: int, end: int | None = None):
    """A block argument cut to the positions start..end-1 (masks along their query dimension, and along their key
    dimension to the keys those positions see)."""
    if isinstance(value, tuple):
        return tuple(_from_position(v, start, n_pos, end) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    end = n_pos if end is None else end
    if value.dim() == 4 and value.shape[-2] == n_pos:  # attention mask [batch, 1, query, key]
        return value[..., start:end, :end] if value.shape[-1] == n_pos else value[..., start:end, :]
    if value.dim() == 1 and value.shape[0] == n_pos:  # cache_position
        return value[start:end]
    if value.dim() in (2, 3) and value.shape[1] == n_pos:  # position ids, rotary cos / sin
        return value[:, start:end]
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
    cache = _RowKV([(k[:, :, :start], v[:, :, :start]) for k, v in run.prefix_kv]) if start > 0 else None
    return _rows_call(run, layer, start, run.n_pos, cache, rows)


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


# ---- rows restarted at a layer and position, each with its own prefix; the last block for the last position -----

class _KeysTaken(Exception):
    """Raised by _RowKV in the block whose keys and values are all that is wanted (the rest is not computed)."""


class _RowKV:
    """Stands in for a KV cache for a batch of rows that start at one position: each attention layer gets its
    prefix keys and values (per row [rows, kv_heads, start, d], or [1, ...] for all rows) in front of its own.
    In layer `take_at` it keeps the keys and values it is given and stops the block (_KeysTaken)."""

    def __init__(self, prefix, take_at: int | None = None):
        self.prefix = prefix  # per layer (keys, values), or None: no earlier positions
        self.take_at = take_at
        self.taken = None

    def update(self, keys, values, layer_idx, *args, **kwargs):
        if layer_idx == self.take_at:
            self.taken = (keys, values)
            raise _KeysTaken
        if self.prefix is None or self.prefix[layer_idx] is None:
            return keys, values
        pk, pv = self.prefix[layer_idx]
        if pk.shape[-2] == 0:
            return keys, values
        rows = keys.shape[0]
        return (torch.cat([pk.to(keys.device, keys.dtype).expand(rows, -1, -1, -1), keys], dim=-2),
                torch.cat([pv.to(values.device, values.dtype).expand(rows, -1, -1, -1), values], dim=-2))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.prefix is None or self.prefix[layer_idx] is None:
            return 0
        return self.prefix[layer_idx][0].shape[-2]


def _rows_call(run: RecordedRun, layer: int, start: int, end: int, cache, rows: int):
    """(args, kwargs) for block `layer` on positions start..end-1 with `cache` where the model passed its own."""
    n_pos = run.n_pos
    cut = start > 0 or end < n_pos
    args = tuple(cache if a is _CACHE else _from_position(a, start, n_pos, end) if cut else a
                 for a in run.block_args[layer])
    kwargs = {k: cache if v is _CACHE else _alibi_rows(v, rows) if k == "alibi" else
              _from_position(v, start, n_pos, end) if cut else v
              for k, v in run.block_kwargs[layer].items()}
    return args, kwargs


def passes_cache(run: RecordedRun, layer: int) -> bool:
    """Whether the model handed its KV cache to block `layer` (where a stand-in can take the keys and values)."""
    return any(a is _CACHE for a in run.block_args[layer]) or \
        any(v is _CACHE for v in run.block_kwargs[layer].values())


def run_rows(lm, run: RecordedRun, layer: int, hidden: torch.Tensor, start: int = 0, prefix=None,
             cancel: CancelToken | None = None, last_block_last_only: bool = False) -> torch.Tensor:
    """The last block's output at the last position [rows, d_model] for `hidden` [rows, pos - start, d_model]
    fed into block `layer`, each row with its own recorded keys and values of the positions before `start`
    (`prefix`: per layer (keys, values) [rows or 1, kv_heads, start, d_head]; None when start == 0). Hooks the
    caller registered apply as in a normal forward pass.

    With last_block_last_only, the last block computes only the keys and values of the positions before the last
    one (it is stopped in its attention once they are handed to the cache) and then the last position alone:
    nothing else of the last block reaches the last position's output in a causal model. The caller checks that
    this holds for the model (`last_block_check`) and registers no hook in the last block."""
    blocks = lm.adapter.blocks
    n = len(blocks)
    h = hidden
    end = run.n_pos
    for L in range(layer, n):
        if cancel is not None:
            cancel.check()
        if L == n - 1 and last_block_last_only and h.shape[1] > 1:
            return _last_block_last_position(lm, run, h, start, prefix)
        cache = _RowKV(prefix) if start > 0 else None
        args, kwargs = _rows_call(run, L, start, end, cache, h.shape[0])
        h = block_output_tensor(blocks[L](h, *args, **kwargs))
    return h[:, -1]


def _last_block_last_position(lm, run: RecordedRun, h: torch.Tensor, start: int, prefix) -> torch.Tensor:
    n = len(lm.adapter.blocks)
    last, block = run.n_pos - 1, lm.adapter.blocks[n - 1]
    taker = _RowKV(prefix if start > 0 else None, take_at=n - 1)
    args, kwargs = _rows_call(run, n - 1, start, last, taker, h.shape[0])
    try:
        block(h[:, :-1], *args, **kwargs)
    except _KeysTaken:
        pass
    if taker.taken is None:
        raise RuntimeError("the last block did not hand its keys and values to the cache")
    keys, values = taker.taken
    rows = h.shape[0]
    if start > 0:
        pk, pv = prefix[n - 1]
        keys = torch.cat([pk.to(keys.device, keys.dtype).expand(rows, -1, -1, -1), keys], dim=-2)
        values = torch.cat([pv.to(values.device, values.dtype).expand(rows, -1, -1, -1), values], dim=-2)
    cache = _RowKV([None] * (n - 1) + [(keys, values)])
    args, kwargs = _rows_call(run, n - 1, last, last + 1, cache, rows)
    return block_output_tensor(block(h[:, -1:], *args, **kwargs))[:, -1]


_LAST_BLOCK_OK = weakref.WeakKeyDictionary()  # model -> whether last_block_last_only holds for it


def last_block_check(lm, run: RecordedRun) -> bool:
    """Whether run_rows with last_block_last_only reproduces the plain last block on this model: measured once
    per model on a recorded run (restarted at the last block from position 0 and from the middle, two rows),
    against its recorded final residual stream, with the conformance check's tolerance."""
    model = lm.model
    if model in _LAST_BLOCK_OK:
        return _LAST_BLOCK_OK[model]
    n = len(lm.adapter.blocks)
    ok = run.n_pos > 1 and run.prefix_kv is not None and passes_cache(run, n - 1)
    if ok:
        from desktop_app.engine.conformance import _REL_TOL

        ref = run.resid_post(n - 1)[:, -1]
        tol = _REL_TOL.get(ref.dtype, 1e-2) * max(1.0, float(ref.float().abs().max()))
        try:
            with torch.inference_mode():
                diffs = []
                for start in (0, run.n_pos // 2):
                    prefix = [(k[:, :, :start], v[:, :, :start]) for k, v in run.prefix_kv] if start else None
                    hidden = run.resid_pre[n - 1][:, start:].expand(2, -1, -1)
                    out = run_rows(lm, run, n - 1, hidden, start, prefix, last_block_last_only=True)
                    diffs.append(float((out.float() - ref.float()).abs().max()))
            ok = max(diffs) <= tol
        except Exception:  # noqa: BLE001 - any failure means: compute the last block in full
            ok = False
    _LAST_BLOCK_OK[model] = ok
    return ok


def unembed_columns(lm, resid_final: torch.Tensor, columns: torch.Tensor) -> torch.Tensor | None:
    """The logits of `columns` only [rows, len(columns)] float32 (the final norm, then the unembedding's rows of
    those tokens), or None when the unembedding is not a plain linear layer."""
    if type(lm.adapter.unembed) is not torch.nn.Linear:
        return None
    return lm.adapter.logits_from_resid(resid_final, columns).float()


def run_block_given_attention(lm, run: RecordedRun, layer: int, hidden: torch.Tensor, attn_output: torch.Tensor,
                              start: int = 0) -> torch.Tensor:
    """Block `layer` on `hidden` [rows, pos - start, d_model] (positions from `start` on) with its attention module
    returning `attn_output` [rows, pos - start, d_model] instead of computing it: where only a head's output
    changes, the attention's output is the output projection of the patched hook_z, and the keys, queries and
    scores need no computing. The caller checks that this holds for the model (`given_attention_check`)."""
    attn = lm.adapter.attn(layer)
    own = attn.__dict__.get("forward")  # a wrapper some loaders install (accelerate's offloading): put back after

    def given(*_args, **_kwargs):
        return attn_output, None
    attn.forward = given
    try:
        args, kwargs = _rows_call(run, layer, start, run.n_pos, None, hidden.shape[0])
        return block_output_tensor(lm.adapter.blocks[layer](hidden, *args, **kwargs))
    finally:
        if own is not None:
            attn.forward = own
        else:
            del attn.forward


_GIVEN_ATTENTION_OK = weakref.WeakKeyDictionary()  # model -> {layer: whether run_block_given_attention holds}


def given_attention_check(lm, run: RecordedRun, layer: int) -> bool:
    """Whether block `layer` run with its attention output given as the output projection of the recorded hook_z
    reproduces the recorded block output (run must have read hook_z of that layer); measured once per model and
    layer, with the conformance check's tolerance."""
    from desktop_app.engine.conformance import _REL_TOL

    seen = _GIVEN_ATTENTION_OK.setdefault(lm.model, {})
    if layer in seen:
        return seen[layer]
    ok = False
    z = run.acts.get(hook_name(layer, "attn.hook_z"))
    if z is not None:
        ref = run.resid_post(layer)
        tol = _REL_TOL.get(ref.dtype, 1e-2) * max(1.0, float(ref.float().abs().max()))
        try:
            with torch.inference_mode():
                out_proj = block_output_tensor(lm.adapter.o_proj(layer)(z.flatten(-2)))
                out = run_block_given_attention(lm, run, layer, run.resid_pre[layer], out_proj)
            ok = float((out.float() - ref.float()).abs().max()) <= tol
        except Exception:  # noqa: BLE001 - any failure means: compute the attention
            ok = False
    seen[layer] = ok
    return ok
