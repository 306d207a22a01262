"""An SAE on a loaded model: feature activations per token, CE loss with the SAE spliced in, and feature
interventions (ablate / clamp / steer). Hooks go through engine.capture, so they are removed on any exit.

The SAE is run in float32 wherever the model lives; interventions keep the SAE's error term
(x - x_hat) so that an empty edit list leaves the model's output unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks, run_with_cache
from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken
from desktop_app.engine.hook_trust import trusted_hook
from desktop_app.engine.sae.formats import check_fits
from desktop_app.engine.sae.model import SAE


def fitted_hook(lm, sae: SAE, hook_name: str | None = None, force_hook: bool = False) -> str:
    """The hook at which `sae` is applied to `lm`: refused (one sentence naming both) when its file names
    another hook or another model, unless force_hook; then its width is checked against the hook's."""
    meta = sae.cfg.metadata or {}
    hook = trusted_hook("SAE", getattr(sae, "source_path", None) or "in memory", sae.cfg.hook_name, hook_name,
                        stated_model=meta.get("model_name"), stated_fingerprint=meta.get("model_fingerprint"),
                        lm=lm, force_hook=force_hook)
    check_fits(sae, hook, lm.hook_point(hook).shape)
    return hook


def _prepare(lm, sae: SAE, hook_name: str | None) -> str:
    return fitted_hook(lm, sae, hook_name)


def run_sae(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat in x's dtype/device/shape, feature acts) for activations from a hook."""
    if sae.device != x.device:
        sae.to(x.device)
    x_hat, f = sae(x.float() if sae.dtype == torch.float32 else x.to(sae.dtype))
    return x_hat.to(x.dtype), f


def feature_activations(lm, sae: SAE, input_ids, hook_name: str | None = None,
                        cancel: CancelToken | None = None) -> torch.Tensor:
    """Feature activations [pos, d_sae] (float32, CPU) of the first sequence of input_ids."""
    hook = _prepare(lm, sae, hook_name)
    _, cache = run_with_cache(lm, input_ids, [hook], cancel=cancel)
    with torch.inference_mode():
        return sae.to("cpu").encode(cache[hook][0].float()).float()


def top_features(acts: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token the k largest activations and their feature ids: ([pos, k], [pos, k])."""
    k = min(max(1, int(k)), acts.shape[-1])
    values, indices = acts.topk(k, dim=-1)
    return values, indices


def feature_table(acts: torch.Tensor, top_k: int = 0) -> tuple[torch.Tensor, list[int]]:
    """The sae_features result: values [position, feature] for all features (top_k 0), else for the union
    over positions of each position's top-k features that are active; returns (values, feature ids)."""
    if top_k <= 0:
        return acts, list(range(acts.shape[-1]))
    values, indices = top_features(acts, top_k)
    chosen = sorted({int(i) for i in indices[values > 0].flatten()})
    return acts[:, chosen], chosen


def _next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> float:
    logits = logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:].to(logits.device)))


@torch.inference_mode()
def ce_loss_with_sae(lm, sae: SAE, input_ids, hook_name: str | None = None,
                     cancel: CancelToken | None = None) -> dict[str, float]:
    """Next-token cross-entropy of the clean model, with the SAE's reconstruction spliced in, and with
    the hook zero-ablated; `recovered` = (zero - spliced) / (zero - clean), 1 = as good as clean."""
    hook = _prepare(lm, sae, hook_name)
    ids = as_ids(input_ids)
    if ids.shape[-1] < 2:
        raise SAEError("The CE loss needs a prompt of at least 2 tokens; use a longer text.")
    clean = _next_token_ce(forward_logits(lm, ids), ids)
    with hooks(lm, write={hook: lambda x: run_sae(sae, x)[0]}, cancel=cancel):
        spliced = _next_token_ce(forward_logits(lm, ids), ids)
    with hooks(lm, write={hook: torch.zeros_like}, cancel=cancel):
        zero = _next_token_ce(forward_logits(lm, ids), ids)
    denom = zero - clean
    recovered = (zero - spliced) / denom if abs(denom) > 1e-12 else float("nan")
    return {"clean": clean, "spliced": spliced, "zero_ablated": zero, "recovered": recovered}


@dataclass
class FeatureEdit:
    feature: int
    mode: str = "ablate"  # "ablate": f = 0; "clamp": f = value; "steer": f += value
    value: float = 0.0
    positions: Sequence[int] | None = None  # None = every position

    def __post_init__(self):
        if self.mode not in ("ablate", "clamp", "steer"):
            raise SAEError(f"Feature edit mode {self.mode!r} is unknown; use ablate, clamp or steer.")


def edit_hook(sae: SAE, edits: Sequence[FeatureEdit], keep_error: bool = True):
    """A write function for the SAE's hook that replaces the activation by the SAE's reconstruction from the
    edited features, plus the SAE's error term (keep_error) so that no edit leaves the activation unchanged."""
    for e in edits:
        if not 0 <= e.feature < sae.d_sae:
            raise SAEError(f"Feature {e.feature} does not exist; this SAE has features 0-{sae.d_sae - 1}.")
    if sae.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
        raise SAEError("Feature edits are not supported for SAEs with per-token input normalisation; "
                       "use an SAE with normalize_activations none.")

    def write(x: torch.Tensor) -> torch.Tensor:
        x_hat, f = run_sae(sae, x)
        f = f.clone()
        for e in edits:
            pos = slice(None) if e.positions is None else torch.as_tensor(
                [p for p in e.positions if p < f.shape[1]], dtype=torch.long, device=f.device)
            if e.mode == "ablate":
                f[:, pos, e.feature] = 0.0
            elif e.mode == "clamp":
                f[:, pos, e.feature] = e.value
            else:
                f[:, pos, e.feature] += e.value
        d_head = x.shape[-1] if x.shape[-1] != sae.d_in else None
        edited = sae.decode(f, d_head=d_head).to(x.dtype)
        return edited + (x - x_hat) if keep_error else edited

    return write


@torch.inference_mode()
def intervene(lm, sae: SAE, input_ids, edits: Sequence[FeatureEdit], hook_name: str | None = None,
              cancel: CancelToken | None = None) -> torch.Tensor:
    """Logits [batch, pos, vocab] (float32, CPU) with the features edited at the SAE's hook."""
    hook = _prepare(lm, sae, hook_name)
    with hooks(lm, write={hook: edit_hook(sae, list(edits))}, cancel=cancel):
        return forward_logits(lm, as_ids(input_ids)).float().cpu()
