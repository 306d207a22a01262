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


class RowBudget:
    """How many rows go through the model at once; shrinks for the rest of a job after an out-of-memory."""

    def __init__(self, rows: int):
        self.rows = max(1, int(rows))


def chunks_shrinking_on_oom(items: list, budget: RowBudget, compute, cancel, what: str = "cell"):
    """Yield (chunk, compute(chunk)) over consecutive chunks of `items`, budget.rows at a time. An out-of-memory
    error halves the budget and retries the same chunk; OutOfMemory when even one row does not fit."""
    from desktop_app.engine.errors import OutOfMemory

    start = 0
    while start < len(items):
        cancel.check()
        chunk = items[start:start + budget.rows]
        try:
            out = compute(chunk)
        except Exception as err:  # noqa: BLE001 - only out-of-memory is retried
            if not is_oom(err):
                raise
            if budget.rows == 1:
                raise OutOfMemory(f"the model ran out of memory even one {what} at a time; free memory or use a "
                                  "smaller dtype.") from err
            budget.rows = max(1, budget.rows // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            continue
        yield chunk, out
        start += len(chunk)
