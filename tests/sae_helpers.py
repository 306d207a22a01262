"""A small SAE with seeded random weights, for tests that need one that is not trained."""
import torch

from desktop_app.engine.sae.model import SAE, SAEConfig


def random_sae(hook_name: str, d_sae: int, seed: int, d_in: int = 32) -> SAE:
    """A standard SAE reading `hook_name`, every parameter drawn from N(0, 0.3^2) with generator seed `seed`."""
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name=hook_name))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae
