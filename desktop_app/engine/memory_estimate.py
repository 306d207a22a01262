"""Will the weights fit? An estimate from the configuration, before a single weight is read or allocated.

The parameter count comes from the model built on the meta device from its configuration (no memory, about a
second for a 70B configuration); a configuration transformers cannot build (remote code) falls back to the
tensor shapes in the safetensors headers. A checkpoint that is already quantised counts its bytes as stored.
Bytes per parameter: the chosen dtype, or for int8 / int4 the quantised linear layers of the blocks (the
embeddings, norms and unembedding stay in the dtype).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from desktop_app.engine.errors import ModelLoadError
from desktop_app.engine.file_checks import ST_ITEMSIZE
from desktop_app.engine.quantize import QUANT_BYTES, QuantPlan

# the weights may take at most this fraction of the free memory: loading and the forward passes need the rest
FIT_FRACTION = 0.9
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
_NOT_QUANTISED = ("embed", "wte", "wpe", "lm_head", "embed_out", "norm", "ln_")


@dataclass(frozen=True)
class WeightCount:
    """Parameters the loaded model will hold: those of the quantisable linear layers and all the others."""
    linear: int
    other: int
    stored_bytes: int | None = None  # a checkpoint that is already quantised: its weights' bytes as stored

    @property
    def total(self) -> int:
        return self.linear + self.other

    def bytes_for(self, dtype: str, quantize: str = "none") -> int:
        if self.stored_bytes is not None:
            return self.stored_bytes
        per = _DTYPE_BYTES.get(dtype, 4)
        if quantize in QUANT_BYTES:
            return int(self.linear * QUANT_BYTES[quantize] + self.other * per)
        return int(self.total * per)


def count_weights(config, folder: Path | None = None, stored: bool = False) -> WeightCount | None:
    """Count from the configuration (a transformers config or a config.json dict); None when neither the
    configuration nor the safetensors headers tell (the load then goes ahead and reports its own errors)."""
    if stored:  # the configuration describes the unquantised model: only the stored bytes tell
        return _header_count(folder) if folder is not None else None
    counted = _meta_count(config)
    if counted is None and folder is not None:
        counted = _header_count(folder)
        if counted is not None:
            counted = WeightCount(counted.linear, counted.other)  # shapes only: bytes follow the chosen dtype
    return counted


def _meta_count(config) -> WeightCount | None:
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    try:
        if isinstance(config, dict):
            cfg = dict(config)
            cfg.pop("quantization_config", None)
            config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - a configuration transformers cannot build: no estimate from it
        return None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linear_ids = set()
    for module in model.modules():
        if isinstance(module, (nn.Linear, Conv1D)) and module is not out:
            linear_ids.add(id(module.weight))
    linear = other = 0
    for p in model.parameters():
        if id(p) in linear_ids:
            linear += p.numel()
        else:
            other += p.numel()
    return WeightCount(linear, other)


def _header_count(folder: Path) -> WeightCount | None:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        return None
    linear = other = nbytes = 0
    for f in files:
        header = _read_header(f)
        if header is None:
            return None
        for name, entry in header.items():
            if name == "__metadata__" or not isinstance(entry, dict):
                continue
            shape, dtype = entry.get("shape"), entry.get("dtype")
            if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
                return None
            n = 1
            for s in shape:
                n *= s
            if dtype not in ST_ITEMSIZE:  # a dtype whose size we do not know: no estimate rather than a guess
                return None
            nbytes += n * ST_ITEMSIZE[dtype]
            if len(shape) == 2 and not any(k in name for k in _NOT_QUANTISED):
                linear += n
            else:
                other += n
    return WeightCount(linear, other, stored_bytes=nbytes)


def _read_header(path: Path) -> dict | None:
    try:
        with open(path, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                return None
            (n,) = struct.unpack("<Q", raw)
            if n > min(path.stat().st_size, 100 * 2**20):
                return None
            header = json.loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return header if isinstance(header, dict) else None


def available_for(torch_device, device_map) -> tuple[int, str]:
    """Free bytes where the weights will go, and how to name that place in a message."""
    import torch

    from desktop_app.engine.memory import available_bytes

    cpu = available_bytes(torch.device("cpu"))
    if device_map == "auto" and torch.cuda.is_available():  # accelerate spreads the model over GPUs and the CPU
        gpus = sum(available_bytes(torch.device("cuda", i)) for i in range(torch.cuda.device_count()))
        return gpus + cpu, "the GPUs and the CPU together"
    if torch_device.type == "cuda":
        return available_bytes(torch_device), f"GPU {torch_device}"
    return cpu, "this computer" if torch_device.type == "cpu" else f"{torch_device} (shared with the CPU)"


def refuse_if_too_big(count: WeightCount | None, dtype: str, plan: QuantPlan, torch_device, device_map,
                      where, available: int | None = None, quantised_after_load: bool = False) -> int | None:
    """Raise ModelLoadError (the estimate and the options) when the weights cannot fit; returns the estimate.
    quantised_after_load (GGUF): the whole model is in memory in its dtype before it is quantised."""
    if count is None:
        return None
    if quantised_after_load:
        plan = QuantPlan()
    need = count.bytes_for(dtype, plan.choice)
    free, place = available_for(torch_device, device_map) if available is None else (available, "this computer")
    if need <= free * FIT_FRACTION:
        return need
    what = dtype if not plan.active else plan.label if plan.choice == "none" else f"{plan.choice} ({dtype} elsewhere)"
    options = []
    if count.stored_bytes is None:
        if dtype == "float32" and plan.choice == "none":
            options.append(f"dtype bfloat16 (about {_gib(count.bytes_for('bfloat16'))})")
        smaller = "bfloat16" if dtype == "float32" else dtype  # the layers int8 / int4 leave alone
        for q in ("int8", "int4") if not quantised_after_load else ():
            if q != plan.choice and not (q == "int8" and plan.choice == "int4"):
                with_dtype = f" with dtype {smaller}" if smaller != dtype else ""
                options.append(f"quantize {q}{with_dtype} (about {_gib(count.bytes_for(smaller, q))})")
    options.append("a GPU with more memory" if torch_device.type == "cuda" else "a GPU (device cuda or auto)")
    raise ModelLoadError(
        f"the model in {where} needs about {_gib(need)} for its {_count_text(count.total)} weights in {what} but "
        f"only {_gib(free)} of memory is free on {place}; choose " + ", ".join(options[:-1])
        + (" or " if len(options) > 1 else "") + options[-1] + ".")


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"


def _count_text(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
