"""Checks of model, weights, tokenizer, GGUF and SAE files before a library parses them, so that a damaged
or hostile file costs one sentence naming the file and what is wrong: never a traceback, never a hang on a
pipe, never an allocation a lying header asks for, and never the advice to unpickle.

The `*_problem` functions return a phrase ("has a corrupt header: ...") or None; `check_model_files`
raises ModelLoadError. No file is ever unpickled here: a PyTorch `.bin` is inspected with `pickletools`,
which lists what the pickle would call without calling anything.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickletools
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

from desktop_app.engine.errors import ModelLoadError
from desktop_app.engine.bounded_io import (BoundedReadError, json_error_text, loads_json, open_regular,
                                          read_regular_bytes)

CONFIG_MAX_BYTES = 16 * 2**20
INDEX_MAX_BYTES = 64 * 2**20
SAFETENSORS_HEADER_MAX = 100 * 2**20
PICKLE_MAX_BYTES = 64 * 2**20

ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E4M3FN": 1, "F8_E8M0": 1,
                "I16": 2, "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                "F64": 8, "C64": 8}


def _kind(mode: int) -> str:
    return ("a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")


def not_regular_problem(path: Path) -> str | None:
    """A phrase when `path` exists but is neither a folder nor a regular file (reading it could hang)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return f"is {_kind(mode)}, not a file"


# ---- safetensors -----------------------------------------------------------------------------------------

def safetensors_problem(path: Path) -> str | None:
    """Check the header of a .safetensors file against the file: its length, its JSON, every tensor's dtype,
    shape and offsets (in the file, matching the shape, not overlapping). None when it is consistent."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            raw = fh.read(8)
            if len(raw) < 8:
                return "is empty or truncated (shorter than the 8-byte header length)"
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > SAFETENSORS_HEADER_MAX:
                return (f"has a corrupt header: it declares a {n}-byte header but the file is only {size} bytes"
                        if n > size - 8 else f"has a corrupt header: it declares a {n}-byte header")
            text = fh.read(n)
    except BoundedReadError as e:
        return f"cannot be used: {e}"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        header = loads_json(text, max_depth=8)
    except (ValueError, UnicodeDecodeError) as e:
        return f"has a corrupt header: it is not valid JSON ({str(e).splitlines()[0][:80]})"
    if not isinstance(header, dict):
        return "has a corrupt header: it is not a JSON object"
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        return "has a corrupt header: __metadata__ must map names to text"
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"has a corrupt header: tensor {name[:80]!r}"
        if not isinstance(info, dict):
            return f"{where} is not described by an object"
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            return f"{where} has no dtype"
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            return f"{where} has an invalid shape {shape!r:.60}"
        if not (isinstance(offsets, list) and len(offsets) == 2 and
                all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) and 0 <= offsets[0] <= offsets[1]):
            return f"{where} has invalid data_offsets {offsets!r:.60}"
        if offsets[1] > data_size:
            return (f"is truncated (shorter than its header says): tensor {name[:80]!r} ends at byte "
                    f"{offsets[1]} of the data but the file holds {data_size}")
        if dtype in ST_ITEMSIZE:
            expected = math.prod(shape) * ST_ITEMSIZE[dtype]
            if offsets[1] - offsets[0] != expected:
                return (f"{where} declares shape {shape} of {dtype} ({expected} bytes) but its data_offsets span "
                        f"{offsets[1] - offsets[0]} bytes")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            return f"has a corrupt header: tensors {n0[:60]!r} and {n1[:60]!r} overlap"
    return None


# ---- index.json, config.json, tokenizer files ---------------------------------------------------------

def _json_file(path: Path, max_bytes: int) -> tuple[Any, str | None]:
    try:
        return loads_json(read_regular_bytes(path, max_bytes)), None
    except BoundedReadError as e:
        return None, f"cannot be used: {e}"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, json_error_text(e)
    except OSError as e:
        return None, f"cannot be read ({e.strerror or e})"


def index_problem(index: Path, folder: Path) -> str | None:
    data, problem = _json_file(index, INDEX_MAX_BYTES)
    if problem:
        return problem
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        return "has no weight_map object, so it is not a valid weights index"
    root = folder.resolve()
    for tensor, shard in data["weight_map"].items():
        if not isinstance(shard, str) or not shard:
            return f"maps tensor {tensor[:80]!r} to {shard!r:.60}, which is not a file name"
        target = (folder / shard).resolve()
        if os.path.isabs(shard) or (root not in target.parents and target != root):
            return f"names the shard {shard[:80]!r}, which lies outside the model folder"
        if not target.is_file():
            return f"lists the weight shard {shard[:80]!r}, which is missing from {folder}"
    return None


_POSITIVE_INTS = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads",
                  "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "max_position_embeddings",
                  "n_positions", "n_ctx", "head_dim", "num_layers", "d_model", "ffn_dim", "rotary_dim")
_NUMBERS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps", "rope_theta", "initializer_range",
            "partial_rotary_factor", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")
_TEXTS = ("model_type", "hidden_act", "activation_function", "torch_dtype", "dtype")
_BOOLS = ("tie_word_embeddings", "use_cache", "use_parallel_residual", "scale_attn_weights")


def _field_type_problem(d: dict, prefix: str, ints: tuple, numbers: tuple, texts: tuple, bools: tuple,
                        min_int: dict | None = None) -> str | None:
    """The first field of `d` whose value has the wrong JSON type (absent and null fields pass);
    whole numbers must be >= min_int.get(key, 1)."""
    for key in ints:
        v, least = d.get(key), (min_int or {}).get(key, 1)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < least):
            return f"has {prefix}{key} = {v!r:.40}, but it must be a whole number >= {least}"
    for key in numbers:
        v = d.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            return f"has {prefix}{key} = {v!r:.40}, but it must be a number"
    for key in texts:
        v = d.get(key)
        if v is not None and not isinstance(v, str):
            return f"has {prefix}{key} = {v!r:.40}, but it must be text"
    for key in bools:
        v = d.get(key)
        if v is not None and not isinstance(v, bool):
            return f"has {prefix}{key} = {v!r:.40}, but it must be true or false"
    return None


def config_problem(config: Any) -> str | None:
    """Wrong types in the fields of config.json that the loader and the adapters rely on."""
    if not isinstance(config, dict):
        return "does not hold a JSON object"
    problem = _field_type_problem(config, "", _POSITIVE_INTS, _NUMBERS, _TEXTS, _BOOLS)
    if problem:
        return problem
    arch = config.get("architectures")
    if arch is not None and not (isinstance(arch, list) and all(isinstance(a, str) for a in arch)):
        return f"has architectures = {arch!r:.40}, but it must be a list of class names"
    for heads_key, width_key in (("num_attention_heads", "hidden_size"), ("n_head", "n_embd")):
        h, w = config.get(heads_key), config.get(width_key)
        if isinstance(h, int) and isinstance(w, int) and h > 0 and config.get("head_dim") is None and w % h:
            return f"has {width_key} = {w}, which {heads_key} = {h} does not divide"
    return None


_TOKENIZER_JSON = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def tokenizer_problem(folder: Path) -> tuple[Path, str] | None:
    """The small JSON files of a tokenizer must be JSON objects; a big tokenizer.json must at least be a file."""
    for name in _TOKENIZER_JSON:
        path = folder / name
        if not os.path.lexists(path):
            continue
        data, problem = _json_file(path, CONFIG_MAX_BYTES)
        if problem:
            return path, problem
        if not isinstance(data, dict):
            return path, "does not hold a JSON object"
    for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt"):
        path = folder / name
        problem = not_regular_problem(path)
        if problem:
            return path, problem
    return None


# ---- PyTorch .bin: inspected, never unpickled --------------------------------------------------------------

_SAFE_GLOBAL_MODULES = ("torch", "collections")


def _pickle_globals(data: bytes) -> list[str]:
    """Every global a pickle would look up, read from its opcodes without executing anything."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("GLOBAL", "INST"):
            found.append(str(arg).replace(" ", "."))
        elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                         "BINSTRING", "STRING"):
            strings.append(str(arg))
        elif op.name == "STACK_GLOBAL":
            found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
    return found


def _unsafe(name: str) -> bool:
    module = name.split(".", 1)[0]
    return module not in _SAFE_GLOBAL_MODULES or (module == "collections" and name != "collections.OrderedDict")


def pytorch_bin_problem(path: Path) -> str | None:
    """A .bin weights file must be a PyTorch zip archive whose pickle only rebuilds tensors."""
    try:
        with open_regular(path) as fh:
            head = fh.read(4)
            if head[:2] != b"PK":
                if head[:1] == b"\x80":
                    return ("is a bare Python pickle (the old PyTorch format), which is never loaded because "
                            "unpickling can run any code; use a safetensors copy of the weights")
                return "is neither a PyTorch zip archive nor a safetensors file"
            fh.seek(0)
            with zipfile.ZipFile(fh) as zf:
                pkl = [i for i in zf.infolist() if i.filename.endswith("data.pkl")]
                if not pkl:
                    return "is a zip archive without the data.pkl of a PyTorch weights file"
                if pkl[0].file_size > PICKLE_MAX_BYTES:
                    return f"has a {pkl[0].file_size}-byte data.pkl, far larger than a weights index needs"
                data = zf.read(pkl[0])
    except BoundedReadError as e:
        return f"cannot be used: {e}"
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, struct.error, NotImplementedError, zlib.error) as e:
        return f"is a damaged PyTorch archive ({type(e).__name__}: {str(e)[:80]})"
    try:
        names = _pickle_globals(data)
    except Exception as e:  # noqa: BLE001 - genops only parses; any failure means a damaged pickle
        return f"has a damaged data.pkl ({type(e).__name__}: {str(e)[:80]})"
    bad = sorted({n for n in names if _unsafe(n)})
    if bad:
        return (f"holds Python objects besides tensors (its pickle calls {', '.join(bad[:3])}), which are never "
                f"loaded; use a safetensors copy of the weights")
    return None


# ---- GGUF ------------------------------------------------------------------------------------------------

_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                 12: "<d"}


class _Truncated(Exception):
    pass


class _Reader:
    def __init__(self, fh, size: int):
        self.fh, self.size = fh, size

    def take(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        if n < 0 or pos + n > self.size:
            raise _Truncated(f"is truncated in its header: {what} at byte {pos} needs {n} bytes but the file "
                             f"ends at byte {self.size}")
        return self.fh.read(n)

    def unpack(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        return self.take(n, what).decode("utf-8", errors="replace")


def _gguf_sizes() -> dict[int, tuple[int, int]]:
    try:
        from gguf.constants import GGML_QUANT_SIZES
    except ImportError:
        return {0: (1, 4), 1: (1, 2)}
    return {int(k): tuple(v) for k, v in GGML_QUANT_SIZES.items()}


def gguf_problem(path: Path) -> str | None:
    """Walk a GGUF header (metadata and tensor table) with every length checked against the file size."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            r = _Reader(io.BufferedReader(fh, 1 << 16), size)
            return _walk_gguf(r, size)
    except BoundedReadError as e:
        return f"cannot be used: {e}"
    except _Truncated as e:
        return str(e)
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"


def _walk_gguf(r: _Reader, size: int) -> str | None:
    if r.take(4, "the magic number") != b"GGUF":
        return "is not a GGUF file (it does not start with GGUF)"
    version = r.unpack("<I", "the version")
    if version not in (2, 3):
        return f"has GGUF version {version}; only versions 2 and 3 are read"
    n_tensors = r.unpack("<Q", "the tensor count")
    n_kv = r.unpack("<Q", "the metadata count")
    if n_tensors > size // 24 or n_kv > size // 12:
        return (f"is truncated or has a corrupt header: it declares {n_tensors} tensors and {n_kv} metadata keys, "
                f"more than its {size} bytes can hold")
    alignment = 32
    for i in range(n_kv):
        key = r.string(f"metadata key {i}")
        vtype = r.unpack("<I", f"the type of {key!r}")
        value = _gguf_value(r, vtype, key)
        if key == "general.alignment":
            if not isinstance(value, int) or value <= 0 or value & (value - 1):
                return f"has a corrupt header: general.alignment is {value!r}, not a power of two"
            alignment = value
    sizes = _gguf_sizes()
    tensors = []
    for i in range(n_tensors):
        name = r.string(f"tensor name {i}")
        n_dims = r.unpack("<I", f"the rank of tensor {name!r}")
        if n_dims > 8:
            return f"has a corrupt header: tensor {name[:60]!r} has {n_dims} dimensions"
        dims = [r.unpack("<Q", f"the shape of tensor {name!r}") for _ in range(n_dims)]
        ttype = r.unpack("<I", f"the type of tensor {name!r}")
        offset = r.unpack("<Q", f"the offset of tensor {name!r}")
        tensors.append((name, dims, ttype, offset))
    start = r.fh.tell()
    data_start = (start + alignment - 1) // alignment * alignment
    for name, dims, ttype, offset in tensors:
        if ttype not in sizes:
            return f"has a corrupt header: tensor {name[:60]!r} has unknown type {ttype}"
        block, type_size = sizes[ttype]
        n = math.prod(dims)
        nbytes = n // block * type_size
        if data_start + offset + nbytes > size:
            return (f"is truncated: tensor {name[:60]!r} ends at byte {data_start + offset + nbytes} but the file "
                    f"has {size} bytes")
    return None


def _gguf_value(r: _Reader, vtype: int, key: str, depth: int = 0):
    if vtype in _GGUF_SCALARS:
        return r.unpack(_GGUF_SCALARS[vtype], f"the value of {key!r}")
    if vtype == 8:
        return r.string(f"the value of {key!r}")
    if vtype == 9 and depth < 2:
        etype = r.unpack("<I", f"the element type of {key!r}")
        count = r.unpack("<Q", f"the length of {key!r}")
        if count > r.size:
            raise _Truncated(f"has a corrupt header: the array {key[:60]!r} declares {count} elements, more than "
                             f"the file has bytes")
        if etype in _GGUF_SCALARS:  # skip fixed-size elements in one step
            r.take(count * struct.calcsize(_GGUF_SCALARS[etype]), f"the values of {key!r}")
            return None
        for _ in range(count):
            _gguf_value(r, etype, key, depth + 1)
        return None
    raise _Truncated(f"has a corrupt header: metadata {key[:60]!r} has unknown value type {vtype}")


# ---- one call for the loader -------------------------------------------------------------------------------

def check_model_files(folder: Path, gguf_file: str | None) -> None:
    """Raise ModelLoadError naming the first damaged file of a model folder or GGUF file."""
    problem = not_regular_problem(folder)
    if problem:
        raise ModelLoadError(f"the model path {folder} {problem}; choose a model folder or a .gguf file.")
    if gguf_file is not None:
        path = folder / gguf_file
        problem = gguf_problem(path)
        if problem:
            raise ModelLoadError(f"the GGUF file {path} {problem}; download or copy it again.")
        return
    config = folder / "config.json"
    if os.path.lexists(config):
        data, problem = _json_file(config, CONFIG_MAX_BYTES)
        problem = problem or config_problem(data)
        if problem:
            raise ModelLoadError(f"{config} {problem}; restore the original file.")
    for index in sorted(folder.glob("*.index.json")):
        problem = index_problem(index, folder)
        if problem:
            raise ModelLoadError(f"the weights index {index} {problem}; restore the original file.")
    weights = sorted(folder.glob("*.safetensors"))
    for st in weights:
        problem = safetensors_problem(st)
        if problem:
            raise ModelLoadError(f"the weights file {st} {problem}; download or copy it again.")
    if not weights:
        for b in sorted(p for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model"))):
            problem = pytorch_bin_problem(b)
            if problem:
                raise ModelLoadError(f"the weights file {b} {problem}.")
    found = tokenizer_problem(folder)
    if found:
        raise ModelLoadError(f"the tokenizer file {found[0]} {found[1]}; copy the model's tokenizer files again.")


_UNPICKLE_ADVICE = ("weights_only", "Weights only load failed", "pickle", "unpickl")


def loader_error_text(text: str) -> str:
    """A library's error text fit for the user: never the advice to unpickle (torch suggests
    weights_only=False, which runs whatever code the file holds)."""
    if any(word.lower() in text.lower() for word in _UNPICKLE_ADVICE):
        return "the file holds Python objects besides tensors, which are never loaded (use a safetensors copy)"
    return text


# ---- SAE files -------------------------------------------------------------------------------------------

_SAE_INTS = ("d_in", "d_sae", "k", "hook_head_index", "context_size", "hook_layer")
_SAE_TEXTS = ("architecture", "activation_fn", "activation_fn_str", "hook_name", "hook_point", "dtype",
              "reshape_activations", "model_name", "device")
_SAE_BOOLS = ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm", "prepend_bos")
_SAE_INT_MINIMA = {"k": 0, "hook_head_index": 0, "context_size": 0, "hook_layer": 0}


def saelens_cfg_problem(raw: dict) -> str | None:
    """Wrong types in an SAELens cfg.json (a "k" of "abc", an apply_b_dec_to_input of "false", ...)."""
    meta = raw.get("metadata") if raw.get("metadata") is not None else raw.get("meta")
    if meta is not None and not isinstance(meta, dict):
        return f"has metadata = {meta!r:.40}, but it must be an object"
    sources = [("", raw)] + ([("metadata.", meta)] if isinstance(meta, dict) else [])
    for prefix, d in sources:
        problem = _field_type_problem(d, prefix, _SAE_INTS, (), _SAE_TEXTS, _SAE_BOOLS, _SAE_INT_MINIMA)
        if problem:
            return problem
    v = raw.get("norm_scaling_factor")
    if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0):
        return f"has norm_scaling_factor = {v!r:.40}, but it must be a positive number"
    v = raw.get("normalize_activations")
    if v is not None and not isinstance(v, (str, bool)):
        return f"has normalize_activations = {v!r:.40}, but it must be text"
    kwargs = raw.get("activation_fn_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return f"has activation_fn_kwargs = {kwargs!r:.40}, but it must be an object"
    if isinstance(kwargs, dict) and kwargs.get("k") is not None and (isinstance(kwargs["k"], bool) or
                                                                     not isinstance(kwargs["k"], int)):
        return f"has activation_fn_kwargs.k = {kwargs['k']!r:.40}, but it must be a whole number"
    return None


def nonfinite_problem(state: dict) -> str | None:
    """The first tensor holding NaN or infinite values (an SAE with them computes garbage silently)."""
    import torch

    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            return f"has {bad} NaN or infinite values in {name}"
    return None
