"""A sparse autoencoder with the inference semantics of SAELens 6 (standard, topk, jumprelu, gated).

    pre   = (norm_in(flatten(x)) - b_dec * apply_b_dec_to_input) @ W_enc + b_enc
    standard: f = relu(pre)            jumprelu: f = relu(pre) * (pre > threshold)
    topk:     pre' = pre * |W_dec row| if rescale_acts_by_decoder_norm; f = relu of the k largest of pre'
    gated:    f = (x' @ W_enc + b_gate > 0) * relu(x' @ (W_enc * exp(r_mag)) + b_mag)
    x_hat = unflatten(norm_out(f' @ W_dec + b_dec)), f' = f / |W_dec row| for topk with rescaling, else f

Normalisation `expected_average_only_in` multiplies the input by a constant scaling factor and divides the
reconstruction by it (SAELens folds that constant into the weights; `fold_scaling_factor` does the same).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from desktop_app.engine.errors import SAEError

ARCHITECTURES = ("standard", "topk", "jumprelu", "gated")
NORMALIZATIONS = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")


@dataclass
class SAEConfig:
    architecture: str
    d_in: int
    d_sae: int
    hook_name: str | None = None
    k: int | None = None
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None  # for expected_average_only_in
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"  # "none" | "hook_z"
    dtype: str = "float32"
    metadata: dict[str, Any] = field(default_factory=dict)  # kept and written back on save
    # settings the file did not state and the loader had to assume, one sentence each (shown with results)
    assumptions: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"SAE architecture {self.architecture!r} is not supported; use one of "
                           f"{', '.join(ARCHITECTURES)}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEError(f"SAE normalize_activations {self.normalize_activations!r} is not supported; use "
                           f"one of {', '.join(NORMALIZATIONS)}.")
        if self.architecture == "topk" and (self.k is None or int(self.k) < 1):
            raise SAEError(f"A topk SAE needs a positive k, got {self.k!r}; set \"k\" in its cfg.json.")
        if self.reshape_activations not in ("none", "hook_z"):
            raise SAEError(f"SAE reshape_activations {self.reshape_activations!r} is not supported; use "
                           "\"none\" or \"hook_z\".")
        if self.reshape_activations == "none" and (self.hook_name or "").endswith("hook_z"):
            self.reshape_activations = "hook_z"


def _param(shape, dtype) -> nn.Parameter:
    # inference by default; training switches gradients on with requires_grad_(True)
    return nn.Parameter(torch.zeros(*shape, dtype=dtype), requires_grad=False)


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x @ w + b with the bias fused into the matmul (addmm) for any number of leading dims."""
    flat = x.reshape(-1, x.shape[-1])
    return torch.addmm(b, flat, w).reshape(*x.shape[:-1], w.shape[-1])


class SAE(nn.Module):
    """Weights are named as SAELens names them, so `state_dict()` is an SAELens weights file."""

    def __init__(self, cfg: SAEConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        d_in, d_sae = cfg.d_in, cfg.d_sae
        self.W_enc = _param((d_in, d_sae), dtype)
        self.W_dec = _param((d_sae, d_in), dtype)
        self.b_dec = _param((d_in,), dtype)
        if cfg.architecture == "gated":
            self.b_gate = _param((d_sae,), dtype)
            self.r_mag = _param((d_sae,), dtype)
            self.b_mag = _param((d_sae,), dtype)
        else:
            self.b_enc = _param((d_sae,), dtype)
        if cfg.architecture == "jumprelu":
            self.threshold = _param((d_sae,), dtype)
        self.log_sparsity: torch.Tensor | None = None  # from sparsity.safetensors, if the SAE came with one

    # --- convenience -------------------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def hook_name(self) -> str | None:
        return self.cfg.hook_name

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    # --- input / output transforms -------------------------------------------------------------------
    def _flatten(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """hook_z activations [..., n_heads, d_head] become [..., n_heads * d_head]."""
        if self.cfg.reshape_activations == "hook_z" and x.dim() >= 2 and x.shape[-1] != self.d_in \
                and x.shape[-2] * x.shape[-1] == self.d_in:
            return x.reshape(*x.shape[:-2], self.d_in), x.shape[-1]
        if x.shape[-1] != self.d_in:
            raise SAEError(f"The SAE expects activations of width {self.d_in} but got shape {tuple(x.shape)}; "
                           f"use it on the hook it was trained on ({self.hook_name or 'unknown'}).")
        return x, None

    def _norm_in(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        mode = self.cfg.normalize_activations
        if mode == "expected_average_only_in" and self.cfg.norm_scaling_factor is not None:
            s = float(self.cfg.norm_scaling_factor)
            return x * s, ("scale", s)
        if mode == "constant_norm_rescale":
            coeff = (self.d_in ** 0.5) / x.norm(dim=-1, keepdim=True)
            return x * coeff, ("coeff", coeff)
        if mode == "layer_norm":
            mu = x.mean(dim=-1, keepdim=True)
            centred = x - mu
            std = centred.std(dim=-1, keepdim=True)
            return centred / (std + 1e-5), ("ln", mu, std)
        return x, None

    @staticmethod
    def _norm_out(x: torch.Tensor, state: Any) -> torch.Tensor:
        if state is None:
            return x
        if state[0] == "scale":
            return x / state[1]
        if state[0] == "coeff":
            return x / state[1]
        return x * state[2] + state[1]

    # --- the SAE -------------------------------------------------------------------------------------
    def _hidden_pre(self, sae_in: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of an already flattened and normalised input (topk: after rescaling)."""
        centred = sae_in - self.b_dec * float(self.cfg.apply_b_dec_to_input)
        if self.cfg.architecture == "gated":
            return _affine(centred, self.W_enc * self.r_mag.exp(), self.b_mag)
        pre = _affine(centred, self.W_enc, self.b_enc)
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        return pre

    def _activate(self, sae_in: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":  # relu(pre) * (pre > threshold) in one pass
            return torch.where(pre > self.threshold.clamp_min(0), pre, pre.new_zeros(()))
        if arch == "topk":
            values, indices = torch.topk(pre, k=min(int(self.cfg.k), self.d_sae), dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        centred = sae_in - self.b_dec * float(self.cfg.apply_b_dec_to_input)
        gate = _affine(centred, self.W_enc, self.b_gate) > 0
        return gate.to(pre.dtype) * torch.relu(pre)

    def _prepare(self, x: torch.Tensor):
        x = x.to(self.dtype)
        flat, d_head = self._flatten(x)
        sae_in, norm_state = self._norm_in(flat)
        return sae_in, norm_state, d_head

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] of activations [..., d_in] (or [..., n_heads, d_head] for hook_z)."""
        sae_in, _, _ = self._prepare(x)
        return self._activate(sae_in, self._hidden_pre(sae_in))

    def encode_with_hidden_pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sae_in, _, _ = self._prepare(x)
        pre = self._hidden_pre(sae_in)
        return self._activate(sae_in, pre), pre

    def _decode_flat(self, f: torch.Tensor) -> torch.Tensor:
        if self.cfg.architecture == "topk" and self.cfg.rescale_acts_by_decoder_norm:
            f = f / self.W_dec.norm(dim=-1)
        return f.to(self.dtype) @ self.W_dec + self.b_dec

    def decode(self, f: torch.Tensor, d_head: int | None = None) -> torch.Tensor:
        """Reconstruction [..., d_in] of feature activations; with d_head a hook_z SAE returns
        [..., n_heads, d_head]. With expected_average_only_in the output is in the input's own scale.
        (constant_norm_rescale / layer_norm need the input's statistics: use forward for those.)"""
        out = self._decode_flat(f)
        if self.cfg.normalize_activations == "expected_average_only_in" and self.cfg.norm_scaling_factor:
            out = out / float(self.cfg.norm_scaling_factor)
        if d_head is not None:
            out = out.reshape(*out.shape[:-1], self.d_in // d_head, d_head)
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_hat shaped like x, feature activations)."""
        sae_in, norm_state, d_head = self._prepare(x)
        f = self._activate(sae_in, self._hidden_pre(sae_in))
        out = self._norm_out(self._decode_flat(f), norm_state)
        if d_head is not None:
            out = out.reshape(*out.shape[:-1], self.d_in // d_head, d_head)
        return out, f

    # --- weight surgery ------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_scaling_factor(self) -> "SAE":
        """Fold an expected_average_only_in scaling factor into the weights (as SAELens does on save):
        the result has normalize_activations "none" and the same input -> output map."""
        if self.cfg.normalize_activations != "expected_average_only_in" or not self.cfg.norm_scaling_factor:
            return self
        s = float(self.cfg.norm_scaling_factor)
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self.cfg = replace(self.cfg, normalize_activations="none", norm_scaling_factor=None)
        return self

    @torch.no_grad()
    def fold_finetuning_scale(self, scale: torch.Tensor) -> None:
        """SAELens' finetuning_scaling_factor multiplies feature acts before the decoder: fold it into W_dec."""
        self.W_dec.mul_(scale.to(self.dtype).reshape(-1, 1))
