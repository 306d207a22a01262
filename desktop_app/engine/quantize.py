"""Weight quantisation at load time (none / int8 / int4) and checkpoints that are already quantised.

The library is bitsandbytes (the `quantize` extra), through transformers' own integration while loading (or
`quantize_in_memory` for a dequantised GGUF model). int8 stores each weight row as int8 with a float scale
(`Linear8bitLt`) and computes weight-only: dequantise, then multiply in the activation's dtype (see
`_int8_weight_only_forward` for why not LLM.int8()'s matmul). int4 is NF4 (`Linear4bit`, blocks of 64 with a
float32 scale, computed in the model's dtype). Both replace each `nn.Linear` / GPT-2 `Conv1D` of the model
(not the unembedding) by a module of the same place and name that takes and returns ordinary tensors, so every
forward hook of `capture.py` attaches and fires as on the float model; embeddings, norms and the unembedding
stay in the chosen dtype.

Why bitsandbytes and not torchao (both measured on torch 2.13 CPU): torchao 0.18 has no int4 CPU kernel (its
CPU int4 layout stores the values in int8 bytes, so it saves nothing over int8), transformers' torchao path
leaves GPT-2's Conv1D layers unquantised, and checkpoints already quantised for interpretability work are mostly
bitsandbytes ones. Both keep forward hooks working and both install against the CPU torch without pulling another.
"""
from __future__ import annotations

import types
import warnings
from dataclasses import dataclass

from desktop_app.engine.errors import ModelLoadError

QUANTIZE = ("none", "int8", "int4")
# bytes a quantised weight element takes with its scales: int8 one byte (+ a float32 scale per output row, left
# out), NF4 half a byte + a float32 absmax per block of 64
QUANT_BYTES = {"int8": 1.0, "int4": 0.5 + 4 / 64}
_INSTALL = "pip install 'interp-workbench[quantize]'"


@dataclass(frozen=True)
class QuantPlan:
    """What the loader does about quantisation: `choice` is what the user asked for; `stored` describes a
    checkpoint that is already quantised (its quant_method), loaded as it is."""
    choice: str = "none"
    stored: str | None = None

    @property
    def label(self) -> str:
        if self.stored:
            return f"{self.stored} (as stored)"
        return self.choice

    @property
    def active(self) -> bool:
        return self.choice != "none" or self.stored is not None


def check_choice(quantize) -> str:
    q = "none" if quantize is None else str(quantize).strip().lower()
    if q not in QUANTIZE:
        raise ModelLoadError(f"unknown quantize {quantize!r}; choose one of {', '.join(QUANTIZE)}.")
    return q


def stored_quantization(config_dict: dict) -> str | None:
    """The quant_method of a checkpoint whose config.json carries a quantization_config, else None."""
    qc = config_dict.get("quantization_config") if isinstance(config_dict, dict) else None
    if not qc:
        return None
    if not isinstance(qc, dict):
        return "unknown"
    method = str(qc.get("quant_method") or "unknown")
    if method == "bitsandbytes":
        method += " 4-bit" if qc.get("load_in_4bit") else " 8-bit"
    return method


def bitsandbytes_available() -> bool:
    try:
        _import_bnb()
    except ImportError:
        return False
    return True


def _import_bnb():
    import logging

    # bitsandbytes logs at import that an optional CPU kernel package is absent (it falls back to torch code)
    # and warns on every int8 matmul that its CPU path casts inputs to float16; neither is the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r"MatMul8bitLt: inputs will be cast")
    import bitsandbytes

    return bitsandbytes


def plan_quantization(quantize, config_dict: dict, where) -> QuantPlan:
    """Checks the choice against the checkpoint and the installed library before anything is loaded."""
    q = check_choice(quantize)
    stored = stored_quantization(config_dict)
    if stored is not None:
        if q != "none":
            raise ModelLoadError(f"the model in {where} is already quantised ({stored}); choose quantize none to "
                                 "load it as it is stored.")
        _check_stored_environment(config_dict["quantization_config"], stored, where)
        return QuantPlan("none", stored)
    if q != "none":
        try:
            _import_bnb()
        except ImportError as err:
            raise ModelLoadError(f"quantize {q} needs the bitsandbytes package, which is not installed; install it "
                                 f"with {_INSTALL}, or choose quantize none to load the model unquantised.",
                                 str(err)) from err
    return QuantPlan(q, None)


def _check_stored_environment(qc, stored: str, where) -> None:
    import torch
    from transformers.quantizers import AutoHfQuantizer

    if stored.startswith("bitsandbytes"):
        try:
            _import_bnb()
        except ImportError as err:
            raise ModelLoadError(f"the model in {where} is stored quantised with bitsandbytes, which is not "
                                 f"installed; install it with {_INSTALL} or use an unquantised copy of the model.",
                                 str(err)) from err
    try:
        quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)
        quantizer.validate_environment(device_map={"": "cpu"}, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - transformers raises ImportError, ValueError or RuntimeError here
        raise ModelLoadError(f"the model in {where} is stored quantised ({stored}) and cannot be loaded here: "
                             f"{_first_line(err)}; install what it names or use an unquantised copy of the model.",
                             str(err)) from err


def from_pretrained_kwargs(plan: QuantPlan, torch_dtype, torch_device, device_map, after_load: bool = False) -> dict:
    """Extra keyword arguments for `from_pretrained`: the bitsandbytes config and a device map (a quantised
    model is placed by transformers while it loads, never moved afterwards with .to()). With after_load (GGUF
    files, which transformers dequantises and will not combine with a quantization_config) the model loads in
    its dtype and `quantize_in_memory` quantises it afterwards."""
    if not plan.active:
        return {}
    kwargs = {"device_map": device_map if device_map is not None else {"": _map_target(torch_device)}}
    if plan.choice == "none" or after_load:
        return kwargs
    from transformers import BitsAndBytesConfig

    # device map auto may put some blocks on the CPU when the GPUs are full: those stay unquantised in the dtype
    offload = device_map == "auto"
    if plan.choice == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=offload)
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=torch_dtype,
                                                           llm_int8_enable_fp32_cpu_offload=offload)
    _check_platform(plan, kwargs, torch_dtype, torch_device)
    return kwargs


def _check_platform(plan: QuantPlan, kwargs: dict, torch_dtype, torch_device) -> None:
    """transformers' own check that bitsandbytes has a backend for the target device, before any weight."""
    from transformers.quantizers import AutoHfQuantizer

    try:
        quantizer = AutoHfQuantizer.from_config(kwargs["quantization_config"])
        quantizer.validate_environment(device_map=kwargs["device_map"], dtype=torch_dtype)
    except Exception as err:  # noqa: BLE001 - ImportError, ValueError or RuntimeError, all the same to the user
        raise run_error(plan, str(torch_device), err) from err


def prepare_loaded(model) -> None:
    """bitsandbytes' NF4 layers repack their weights in place on the first no-grad CPU forward pass, for a
    kernel that needs out_features divisible by 32 and an optional package (without it the repacked layer
    computes the same numbers, slower, and other shapes fail an assertion). Keep every layer on the one
    generic path: the same numbers with and without gradients, any shape."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
        if type(module).__name__ == "Linear8bitLt":
            module.forward = types.MethodType(_int8_weight_only_forward, module)


def _int8_weight_only_forward(self, x):
    """int8 storage, computed in the activation's dtype: the weight is dequantised (int8 x row scale / 127, as
    bitsandbytes' own CPU path MatMul8bitFp does) and multiplied in full precision. LLM.int8()'s default
    matmul would instead quantise the activations too and pick the outlier columns over the whole batch, so a
    patched row's value would depend on which other rows share its forward pass."""
    import torch

    scale = self.weight.SCB if getattr(self.weight, "SCB", None) is not None else self.state.SCB
    weight = self.weight.data.to(x.dtype) * (scale.to(x.dtype) / 127.0).unsqueeze(1)
    bias = None if self.bias is None else self.bias.to(x.dtype)
    return torch.nn.functional.linear(x, weight, bias)


def quantize_in_memory(model, choice: str, compute_dtype) -> None:
    """Replace each nn.Linear / Conv1D of a loaded model (not the unembedding) by its bitsandbytes int8 or NF4
    module, on the device it is on: what transformers does while loading, for a model already in memory."""
    import torch
    from transformers.pytorch_utils import Conv1D

    bnb = _import_bnb()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is torch.nn.Linear or isinstance(m, Conv1D)) and m is not out]
    for name, module in targets:
        weight = module.weight.detach()
        if isinstance(module, Conv1D):  # Conv1D keeps its weight as [in, out]
            weight = weight.t()
        device = weight.device
        weight = weight.to("cpu", torch.float32).contiguous()  # bitsandbytes quantises while moving off the CPU
        has_bias = module.bias is not None
        if choice == "int8":
            new = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], has_bias, has_fp16_weights=False,
                                      device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
        else:
            new = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], has_bias, compute_dtype=compute_dtype,
                                    quant_type="nf4", compress_statistics=False, device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4",
                                              compress_statistics=False).to(device)
        if has_bias:
            new.bias = torch.nn.Parameter(module.bias.detach().to(device, compute_dtype), requires_grad=False)
        new.train(module.training)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    prepare_loaded(model)


def _map_target(device):
    return device.index if device.type == "cuda" and device.index is not None else str(device)


def weights_bytes(model) -> int:
    """Bytes the weights take as stored (after quantisation: packed data plus scales), each storage once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        for part in _plain_tensors(t):
            if part.device.type == "meta":
                continue
            key = (part.untyped_storage().data_ptr(), part.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            total += part.numel() * part.element_size()
    return total


def parameter_count(model) -> int:
    """Parameters of the model as trained: a packed 4-bit weight counts its unpacked elements."""
    total = 0
    for p in model.parameters():
        shape = getattr(getattr(p, "quant_state", None), "shape", None)
        total += _numel(shape) if shape is not None else p.numel()
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _plain_tensors(t):
    """A tensor subclass that wraps others (torchao) reports its logical dtype; count its inner tensors."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t).__name__ not in ("Tensor", "Parameter"):
        try:
            names = flatten()[0]
        except Exception:  # noqa: BLE001
            names = []
        if names:
            for n in names:
                yield from _plain_tensors(getattr(t, n))
            return
    yield t


def run_error(plan: QuantPlan, device_text: str, err: BaseException) -> ModelLoadError:
    """The one sentence for a quantised model whose first forward pass fails on this platform."""
    return ModelLoadError(f"quantize {plan.label} cannot run on {device_text} with this bitsandbytes build "
                          f"({_first_line(err).rstrip('.')}); choose another device, or quantize none to load the "
                          "model unquantised.", str(err))


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]
