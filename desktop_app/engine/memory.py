"""How many patched rows fit in one forward pass, and recognising out-of-memory errors."""
from __future__ import annotations

import torch

MAX_ROWS_CPU = 64
MAX_ROWS_GPU = 512


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30


def bytes_per_row(lm, n_pos: int) -> int:
    """Peak activation memory of one row through one block, with margin (attention scores, MLP hidden)."""
    i = lm.info
    elem = 4 if i.dtype == "float32" else 2
    per_block = n_pos * (6 * i.d_model + 2 * i.d_mlp) + 3 * i.n_heads * n_pos * n_pos
    return int(per_block * elem * 3 + i.vocab_size * 4 * 2)


def rows_per_batch(lm, n_pos: int, budget_fraction: float = 0.25) -> int:
    device = lm.input_device
    budget = available_bytes(device) * budget_fraction
    cap = MAX_ROWS_GPU if device.type == "cuda" else MAX_ROWS_CPU
    return int(max(1, min(cap, budget // max(bytes_per_row(lm, n_pos), 1))))


def is_oom(err: BaseException) -> bool:
    if isinstance(err, getattr(torch, "OutOfMemoryError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text
                                              or "not enough memory" in text)
