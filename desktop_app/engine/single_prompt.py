"""What the single-prompt analyses (lenses, attention, direct logit attribution, token attribution) share:
choosing the prompt they read, and checking a computed quantity against the model before it is shown."""
from __future__ import annotations

import torch

from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.prompts import PromptPair


def prompt_tokens(lm, pair: PromptPair | None, prompt: str = "clean", prepend_bos: bool | None = None) -> TokenInfo:
    """The tokens an analysis reads: the pair's clean or corrupted prompt, or `prompt` itself as literal text."""
    if prompt in ("clean", "corrupted"):
        if pair is None:
            raise PromptError(f"the analysis reads the {prompt} prompt but none is set; type one.")
        return pair.clean if prompt == "clean" else pair.corrupted
    if not isinstance(prompt, str) or not prompt.strip():
        raise SpecError("prompt must be 'clean', 'corrupted' or the text to analyse.")
    return lm.tokenize(prompt, prepend_bos, what="prompt")


def tolerance(reference: torch.Tensor, computed_in: torch.dtype | None = None, magnitude: float = 0.0) -> float:
    """How far two float computations of `reference`'s quantity may differ (rounding and summation order, not a
    bug), when the model computed in `computed_in` (default: the reference's own dtype). `magnitude`: the size
    of the terms that were summed (rounding grows with them, not with a small total they cancel to)."""
    scale = float(reference.detach().abs().max()) if reference.numel() else 1.0
    dtype = computed_in or reference.dtype
    rel = 1e-4 if dtype in (torch.float32, torch.float64) else 2e-2
    return rel * max(1.0, scale, float(magnitude)) + 1e-5


def check_close(what: str, got: torch.Tensor, want: torch.Tensor, refused_error=SpecError, tol: float | None = None,
                computed_in: torch.dtype | None = None, magnitude: float = 0.0):
    """Raise `refused_error` naming `what` and the measured difference when `got` and `want` differ."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    diff = float((got - want).abs().max()) if got.numel() else 0.0
    limit = tolerance(want, computed_in, magnitude) if tol is None else tol
    if not diff <= limit:
        raise refused_error(f"refused: {what} differs from the model's own computation by {diff:.3g} "
                            f"(allowed {limit:.1g}) for this model, so the result would be wrong.")
    return diff
