"""Reconstruction and sparsity metrics over a batch of activations x [n, d] and reconstructions x_hat."""
from __future__ import annotations

import torch


def l0(feature_acts: torch.Tensor) -> float:
    """Mean number of non-zero features per token."""
    return float((feature_acts != 0).sum(dim=-1).float().mean())


def reconstruction_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Squared error |x - x_hat|^2 per token: shape x.shape[:-1]."""
    return (x.float() - x_hat.float()).pow(2).sum(dim=-1)


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - E|x - x_hat|^2 / (E|x|^2 - |E x|^2), expectations over the tokens (all leading dims)."""
    x = x.float().reshape(-1, x.shape[-1])
    x_hat = x_hat.float().reshape(-1, x.shape[-1])
    err = (x - x_hat).pow(2).sum(dim=-1).mean()
    total = x.pow(2).sum(dim=-1).mean() - x.mean(dim=0).pow(2).sum()
    return float(1.0 - err / total.clamp_min(1e-12))


def dead_fraction(fired: torch.Tensor) -> float:
    """Fraction of features that never fired, given a boolean [d_sae] 'has fired' mask."""
    return float((~fired.bool()).float().mean())


@torch.no_grad()
def evaluate(sae, x: torch.Tensor, batch_size: int = 4096) -> dict[str, float]:
    """L0, explained variance, mean reconstruction error and dead fraction of an SAE on activations x."""
    errors, fired, nonzero, outs = [], torch.zeros(sae.d_sae, dtype=torch.bool), 0.0, []
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start:start + batch_size].to(sae.device)
        x_hat, f = sae(chunk)
        errors.append(reconstruction_error(chunk, x_hat).cpu())
        fired |= (f != 0).any(dim=0).cpu()
        nonzero += float((f != 0).sum())
        outs.append(x_hat.cpu())
    x_hat = torch.cat(outs)
    n = max(x.shape[0], 1)
    return {"l0": nonzero / n, "explained_variance": explained_variance(x.cpu(), x_hat),
            "mse": float(torch.cat(errors).mean()), "dead_fraction": dead_fraction(fired)}
