"""Direct logit attribution: how much each head, attention layer and MLP writes logit(answer) - logit(wrong)
straight into the residual stream at the last position (TransformerLens `logit_attrs` with the final norm
applied from the clean run's cache).

The residual stream entering the final norm is embed + sum over layers of (attn_out + mlp_out), and attn_out
is sum over heads of z_h W_O^h plus the output projection's bias. With the final norm's scale frozen at its
value on the actual stream, the norm is affine: N(x) = g * P(x) / s + b (P centres for LayerNorm, is the
identity for RMSNorm), so the logit difference splits exactly into one term per component plus the bias
share (the norm's b, the unembedding's bias and, per head, the output projections' biases). Every identity
used here is checked on the run itself, and the parts must sum to the model's logit difference.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.results import AnalysisResult
from desktop_app.engine.single_prompt import check_close

GRANULARITIES = ("heads", "layers")


class FrozenNorm:
    """The final norm as an affine map with its scale frozen at a given residual vector x [d_model]."""

    def __init__(self, norm: torch.nn.Module, x: torch.Tensor):
        x = x.double()
        with torch.no_grad():
            apply = lambda v: norm(v.to(_dtype(norm))[None]).double()[0]  # noqa: E731
            # LayerNorm ignores a constant added to every coordinate, an RMS norm does not
            out = apply(x)
            shift = 4.0 * float(x.pow(2).mean().sqrt()) + 1.0
            self.centred = bool(torch.allclose(apply(x + shift), out, atol=1e-3 * float(out.abs().max()) + 1e-6))
            eps = next((float(getattr(norm, a)) for a in ("eps", "variance_epsilon", "epsilon")
                        if isinstance(getattr(norm, a, None), (int, float))), 0.0)
            d = x.shape[-1]
            probe = torch.ones(d, dtype=torch.float64)
            probe[1::2] = -1.0
            bias = apply(torch.zeros(d, dtype=torch.float64))
            self.bias = torch.where(torch.isfinite(bias), bias, torch.zeros_like(bias))
            p = self._centre(probe)
            self.gain = (apply(probe) - self.bias) * torch.sqrt(p.pow(2).mean() + eps) / p
            self.scale = torch.sqrt(self._centre(x).pow(2).mean() + eps)
            self.actual = out

    def _centre(self, v: torch.Tensor) -> torch.Tensor:
        return v - v.mean(-1, keepdim=True) if self.centred else v

    def linear(self, v: torch.Tensor) -> torch.Tensor:
        """The scale-frozen norm without its bias, applied to components v [..., d_model]."""
        return self.gain * self._centre(v.double()) / self.scale


def _dtype(module: torch.nn.Module) -> torch.dtype:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else torch.float32


def head_outputs(o_proj: torch.nn.Module, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-head outputs [head, d_model] of z [head, d_head] through the output projection, its bias [d_model])."""
    n_heads, d_head = z.shape
    masked = torch.zeros(n_heads, n_heads, d_head, dtype=z.dtype, device=z.device)
    masked[torch.arange(n_heads), torch.arange(n_heads)] = z
    with torch.no_grad():
        bias = o_proj(torch.zeros(1, n_heads * d_head, dtype=z.dtype, device=z.device))[0]
        out = o_proj(masked.reshape(n_heads, n_heads * d_head)) - bias
    return out.double().cpu(), bias.double().cpu()


def direct_logit_attribution_job(lm, tokens: TokenInfo, answer_id: int, wrong_id: int, granularity: str = "heads",
                                 name: str = "direct_logit_attribution", prompt_label: str = "clean",
                                 cancel: CancelToken | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if granularity not in GRANULARITIES:
        raise SpecError(f"granularity must be heads or layers, not {granularity!r}.")
    if answer_id is None or wrong_id is None or answer_id == wrong_id:
        raise SpecError("direct logit attribution needs an answer and a different wrong answer; type both.")
    if lm.adapter.final_logit_softcap:
        raise SpecError("refused: this model caps its logits with tanh (final_logit_softcapping), so the logit "
                        "difference does not split into per-component parts.")
    a, n_layers, n_heads = lm.adapter, lm.info.n_layers, lm.info.n_heads
    yield Progress(0, 3, "one forward pass")
    names = [hook_name(0, "resid_pre"), hook_name(n_layers - 1, "resid_post")]
    for L in range(n_layers):
        names += [hook_name(L, "attn.hook_z"), hook_name(L, "attn_out"), hook_name(L, "mlp_out")]
    logits, store = run_with_cache(lm, [tokens.ids], names, cancel=cancel)
    last = {n: t[0, -1].double() for n, t in store.items()}
    total = float(logits[0, -1, answer_id] - logits[0, -1, wrong_id])
    yield Progress(1, 3, "splitting the residual stream")

    embed = last[names[0]]
    attn = torch.stack([last[hook_name(L, "attn_out")] for L in range(n_layers)])
    mlp = torch.stack([last[hook_name(L, "mlp_out")] for L in range(n_layers)])
    final = last[names[1]]
    computed_in = getattr(torch, lm.info.dtype, None)
    terms = float((embed.abs() + attn.abs().sum(0) + mlp.abs().sum(0)).max())
    check_close("embedding + attention + MLP outputs (the residual stream)", embed + attn.sum(0) + mlp.sum(0), final,
                computed_in=computed_in, magnitude=terms)
    d_model = embed.shape[-1]
    heads, o_bias = torch.zeros(0, n_heads, d_model, dtype=torch.float64), torch.zeros(0, d_model, dtype=torch.float64)
    if granularity == "heads":
        heads, o_bias = _per_head(lm, store, attn, cancel, computed_in)  # [layer, head, d], [layer, d]

    norm = FrozenNorm(a.final_norm, final.to(torch.float32))
    check_close("the final norm with its scale frozen", norm.linear(final) + norm.bias, norm.actual,
                computed_in=computed_in)
    yield Progress(2, 3, "through the unembedding")
    rows = torch.cat([embed[None], heads.reshape(-1, d_model), o_bias, mlp, attn])
    parts = _logit_diff_of(lm, norm.linear(rows), answer_id, wrong_id)
    n_hd = heads.shape[0] * n_heads
    embed_part = float(parts[0])
    n_b = o_bias.shape[0]
    head_parts = parts[1:1 + n_hd].reshape(-1, n_heads)
    o_bias_parts = parts[1 + n_hd:1 + n_hd + n_b]
    mlp_parts = parts[1 + n_hd + n_b:1 + n_hd + n_b + n_layers]
    attn_parts = parts[1 + n_hd + n_b + n_layers:]
    unembed_bias = float(_logit_diff_of(lm, norm.bias[None], answer_id, wrong_id, with_bias=True)[0])
    if granularity == "heads":
        values = head_parts
        bias_part = unembed_bias + float(o_bias_parts.sum())
        other = float(mlp_parts.sum())
        dims, labels = ["layer", "head"], {"head": [str(h) for h in range(n_heads)]}
    else:
        values = torch.stack([attn_parts, mlp_parts], dim=1)
        bias_part, other = unembed_bias, 0.0
        dims, labels = ["layer", "sublayer"], {"sublayer": ["attn", "mlp"]}
    parts_sum = float(values.sum()) + other + embed_part + bias_part
    magnitude = float(values.abs().sum()) + float(mlp_parts.abs().sum()) + abs(embed_part) + abs(bias_part)
    check_close("the sum of the direct logit attributions (the logit difference)",
                torch.tensor([parts_sum]), torch.tensor([total]), computed_in=computed_in, magnitude=magnitude)
    values = values.numpy().astype(np.float32)
    result = AnalysisResult(
        name=name, kind="direct_logit_attribution", params=dict(prompt=prompt_label, granularity=granularity),
        dims=dims, values=values, labels={"layer": [str(L) for L in range(n_layers)], **labels},
        tokens_clean=np.array(tokens.ids, dtype=np.int64), clean_metric=total,
        extras={"embed": np.array([embed_part], dtype=np.float32), "bias": np.array([bias_part], dtype=np.float32),
                "logit_diff": np.array([total], dtype=np.float32),
                "attn_layers": attn_parts.numpy().astype(np.float32),
                "mlp_layers": mlp_parts.numpy().astype(np.float32)})
    yield Partial(index=np.indices(values.shape, sparse=True), values=values.copy())
    yield Progress(3, 3, "done")
    result.elapsed_s = time.perf_counter() - t0
    return result


def _per_head(lm, store, attn: torch.Tensor, cancel: CancelToken, computed_in):
    """Per layer, each head's output through the output projection and the projection's bias; checked to add
    up to the layer's attention output (refused where a norm sits after the projection, as in Gemma 2)."""
    a = lm.adapter
    heads, biases = [], []
    for L in range(lm.info.n_layers):
        cancel.check()
        o_proj = a.o_proj(L)
        z = store[hook_name(L, "attn.hook_z")][0, -1].to(next(o_proj.parameters()).device, _dtype(o_proj))
        h, b = head_outputs(o_proj, z)
        check_close(f"the sum of layer {L}'s head outputs and bias (its attention output)", h.sum(0) + b, attn[L],
                    computed_in=computed_in, magnitude=float((h.abs().sum(0) + b.abs()).max()))
        heads.append(h)
        biases.append(b)
    return torch.stack(heads), torch.stack(biases)


def _logit_diff_of(lm, vectors: torch.Tensor, answer_id: int, wrong_id: int, with_bias: bool = False) -> torch.Tensor:
    """logit(answer) - logit(wrong) of rows [n, d_model] through the unembedding, without its bias unless
    with_bias (float64, CPU)."""
    unembed = lm.adapter.unembed
    device, dtype = next(unembed.parameters()).device, _dtype(unembed)
    out = []
    with torch.no_grad():
        zero = unembed(torch.zeros(1, vectors.shape[-1], device=device, dtype=dtype))[0].double()
        for chunk in vectors.split(256):
            lg = unembed(chunk.to(device, dtype)).double()
            if not with_bias:
                lg = lg - zero
            out.append((lg[:, answer_id] - lg[:, wrong_id]).cpu())
    return torch.cat(out)
