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
from desktop_app.engine.capture import as_ids, forward_logits, hooks
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken


@dataclass
class RecordedRun:
    ids: torch.Tensor  # [1, pos]
    logits_last: torch.Tensor  # [vocab], float32, CPU
    resid_pre: list[torch.Tensor]  # per layer [1, pos, d_model] on the block's device
    block_kwargs: list[dict]
    block_args: list[tuple]  # positional arguments after the hidden state (GPT-2 passes its mask this way)
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
            kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kept["use_cache"] = False
            kept.pop("past_key_values", None)
            kept.pop("layer_past", None)
            kwargs_per_block[index] = kept
            # a positional KV cache (GPT-2's second argument) is not wanted: use_cache is off
            args_per_block[index] = tuple(None if _is_cache(a) else a for a in args[1:])
        return hook

    last = hook_name(len(blocks) - 1, "resid_post")
    reads = [hook_name(L, "resid_pre") for L in range(len(blocks))] + [last] + list(extra_reads)
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(keeper(i), with_kwargs=True))
        with torch.inference_mode(), hooks(lm, read=reads, cancel=cancel) as store:
            logits = forward_logits(lm, as_ids(ids))
    finally:
        for h in handles:
            h.remove()
    resid = [store.pop(hook_name(L, "resid_pre")) for L in range(len(blocks))]
    acts = dict(store)
    return RecordedRun(ids=as_ids(ids), logits_last=logits[0, -1].float().cpu(), resid_pre=resid,
                       block_kwargs=kwargs_per_block, block_args=args_per_block, acts=acts)


def _is_cache(obj) -> bool:
    return type(obj).__name__.endswith("Cache")


def run_from_layer(lm, run: RecordedRun, layer: int, hidden: torch.Tensor, cancel: CancelToken | None = None,
                   last_only: bool = True) -> torch.Tensor:
    """Feed `hidden` [batch, pos, d_model] into block `layer` and run to the logits. Returns float32 logits
    [batch, vocab] at the last position (or [batch, pos, vocab] if not last_only). Hooks registered by the
    caller (e.g. a write at this layer) apply as in a normal forward pass."""
    blocks = lm.adapter.blocks
    h = hidden
    for L in range(layer, len(blocks)):
        if cancel is not None:
            cancel.check()
        h = block_output_tensor(blocks[L](h, *run.block_args[L], **run.block_kwargs[L]))
    if last_only:
        h = h[:, -1]
    return lm.adapter.logits_from_resid(h).float()
