"""Test helper: plant a direction in a tiny model's residual stream for chosen texts only.

The texts of a synthetic dataset are random word sequences; a write hook adds `sign * scale * v` at one hook
point for the rows whose first tokens belong to a text with a label, so that the label is a linear function
of v from that hook point on and invisible before it.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from desktop_app.demo_task import NAMES, PLACES
from desktop_app.engine.capture import hooks

WORDS = [n for n in NAMES] + [p for p in PLACES]
PREFIX = 5  # tokens that identify a text


def random_texts(lm, n: int, seed: int, length: int = 8) -> list[str]:
    """n distinct texts of `length` words whose first PREFIX tokens differ."""
    rng = np.random.default_rng(seed)
    texts, seen = [], set()
    while len(texts) < n:
        text = " ".join(rng.choice(WORDS, size=length))
        key = tuple(lm.tokenize(text).ids[:PREFIX])
        if key not in seen:
            seen.add(key)
            texts.append(text)
    return texts


@contextlib.contextmanager
def planted(lm, hook: str, offsets: dict[str, np.ndarray]):
    """While active, the rows whose text is in `offsets` get that vector added at every position of `hook`."""
    by_prefix = {tuple(lm.tokenize(t).ids[:PREFIX]): torch.as_tensor(v, dtype=torch.float32)
                 for t, v in offsets.items()}
    current: dict = {}

    def remember_ids(_mod, args, kwargs):
        current["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def add(act):
        ids = current["ids"]
        delta = torch.zeros(act.shape[0], act.shape[-1], dtype=act.dtype, device=act.device)
        for row in range(act.shape[0]):
            v = by_prefix.get(tuple(int(i) for i in ids[row, :PREFIX].tolist()))
            if v is not None:
                delta[row] = v.to(act.dtype)
        return act + delta[:, None, :]

    handle = lm.model.register_forward_pre_hook(remember_ids, with_kwargs=True)
    try:
        with hooks(lm, write={hook: add}):
            yield
    finally:
        handle.remove()
