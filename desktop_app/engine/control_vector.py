"""llama.cpp control vectors (GGUF) and steering directions as safetensors: write, read, and map to hook points.

The file llama.cpp's `--control-vector` / `--control-vector-scaled` reads (common_control_vector_load_one and
llama_adapter_cvec::apply): general.architecture `controlvector`, `controlvector.model_hint` (the model type,
a hint only) and `controlvector.layer_count` (uint32, the number of direction tensors, as repeng writes it),
and one F32 1-D tensor `direction.{il}` of n_embd values per layer. llama.cpp adds direction.{il} to the
output of decoder block il (0-based; `l_out` after `build_cvec(cur, il)`), at every position; il = 0 is
refused by its loader. So direction.{il} is our `blocks.{il}.hook_resid_post`, for il in 1 .. n_layer - 1,
and `blocks.{il}.hook_resid_pre` equals direction.{il - 1}.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name

ARCH = "controlvector"


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise SpecError("control vectors need the gguf package; install it with pip install 'interp-workbench[gguf]'.") \
            from exc
    return gguf


def _atomic_target(path) -> tuple[Path, Path]:
    p = Path(path).expanduser()
    if p.is_symlink() or (p.exists() and not p.is_file()):
        raise SpecError(f"{p} is not a regular file; choose another output path.")
    return p, p.with_name(f".{p.name}.{os.getpid()}.tmp")


def llama_cpp_layers(kind: str, directions: np.ndarray) -> tuple[dict[int, np.ndarray], list[int]]:
    """({llama.cpp layer il: direction}, [our layers that llama.cpp cannot steer]) for directions [layer, d] at
    hook kind resid_post or resid_pre."""
    out, dropped = {}, []
    n = directions.shape[0]
    for layer in range(n):
        if kind == "resid_post":
            il = layer
        elif kind == "resid_pre":
            il = layer - 1
        else:
            raise SpecError(f"llama.cpp control vectors act on the residual stream between blocks; {kind} directions "
                            "cannot be exported, use resid_post or resid_pre.")
        if il >= 1:
            out[il] = np.asarray(directions[layer], dtype=np.float32)
        else:
            dropped.append(layer)
    return out, dropped


def write_control_vector(path, directions: dict[int, np.ndarray], model_hint: str) -> Path:
    """Write {llama.cpp layer il >= 1: [n_embd] float32} as a llama.cpp control-vector GGUF."""
    gguf = _gguf()

    if not directions:
        raise SpecError("there is no layer llama.cpp can steer (it steers the outputs of blocks 1 and later); "
                        "compute directions at later layers.")
    widths = {np.asarray(v).shape for v in directions.values()}
    if len(widths) != 1 or len(next(iter(widths))) != 1:
        raise SpecError(f"control-vector directions must all be 1-D of one width, not {sorted(widths)}.")
    if min(directions) < 1:
        raise SpecError("llama.cpp refuses direction.0; control vectors start at layer 1.")
    p, tmp = _atomic_target(path)
    writer = gguf.GGUFWriter(str(tmp), ARCH)
    writer.add_string(f"{ARCH}.model_hint", str(model_hint))
    writer.add_uint32(f"{ARCH}.layer_count", len(directions))
    for il in sorted(directions):
        writer.add_tensor(f"direction.{il}", np.ascontiguousarray(directions[il], dtype=np.float32))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, p)
    return p


def read_control_vector(path) -> tuple[dict[int, np.ndarray], dict]:
    """({llama.cpp layer: direction float32}, {"model_hint", "layer_count"}); SpecError for a file that is not
    a control vector as llama.cpp would load it."""
    gguf = _gguf()

    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{p} does not exist or is not a file; choose a control-vector .gguf file.")
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise SpecError(f"{p} is not a readable GGUF file ({exc.__class__.__name__}); choose a llama.cpp control "
                        "vector.", details=str(exc)) from exc
    meta = {}
    for key in ("general.architecture", f"{ARCH}.model_hint", f"{ARCH}.layer_count"):
        field = reader.fields.get(key)
        if field is None:
            continue
        value = field.parts[field.data[0]]
        meta[key] = bytes(value).decode("utf-8") if field.types[0] == gguf.GGUFValueType.STRING else int(value[0])
    if meta.get("general.architecture") != ARCH:
        raise SpecError(f"{p} is a GGUF of architecture {meta.get('general.architecture')!r}, not a control vector "
                        f"({ARCH!r}); choose a control-vector file.")
    out: dict[int, np.ndarray] = {}
    width = None
    for t in reader.tensors:
        prefix, _, index = t.name.partition(".")
        if prefix != "direction" or not index.isdigit() or int(index) < 1:
            raise SpecError(f"{p} has a tensor {t.name!r}; a control vector holds only direction.N with N >= 1.")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise SpecError(f"tensor {t.name} of {p} is not a 1-D float32 vector, as llama.cpp requires.")
        vec = np.array(t.data, dtype=np.float32).reshape(-1)
        if width is not None and vec.shape[0] != width:
            raise SpecError(f"{p} mixes directions of widths {width} and {vec.shape[0]}; it is not one model's.")
        width = vec.shape[0]
        out[int(index)] = vec
    if not out:
        raise SpecError(f"{p} holds no direction tensors; it is an empty control vector.")
    return out, {"model_hint": meta.get(f"{ARCH}.model_hint", ""), "layer_count": meta.get(f"{ARCH}.layer_count"),
                 "width": width}


def load_control_vector_for(lm, path) -> dict[int, np.ndarray]:
    """The file's {llama.cpp layer: direction}, refused (one sentence) unless it fits this model."""
    directions, meta = read_control_vector(path)
    if meta["width"] != lm.info.d_model:
        raise SpecError(f"the control vector {Path(path).name} has width {meta['width']} but this model's d_model is "
                        f"{lm.info.d_model}; use a control vector made for this model.")
    last = max(directions)
    if last >= lm.info.n_layers:
        raise SpecError(f"the control vector {Path(path).name} steers layer {last} but this model has layers "
                        f"0-{lm.info.n_layers - 1}; use a control vector made for this model.")
    return directions


def control_vector_writes_for(lm, path, coefficient: float = 1.0) -> dict:
    """{hook name: write} that apply a control-vector file to this model as llama.cpp would (each direction
    added, times coefficient, to its block's output at every position)."""
    from desktop_app.engine.edits import add_direction

    return {hook_name(il, "resid_post"): add_direction(v, coefficient)
            for il, v in sorted(load_control_vector_for(lm, path).items())}


def control_vector_as_directions(lm, path) -> np.ndarray:
    """The file's directions as [layer, d_model] at resid_post (zeros where it has none)."""
    out = np.zeros((lm.info.n_layers, lm.info.d_model), dtype=np.float32)
    for il, v in load_control_vector_for(lm, path).items():
        out[il] = v
    return out


# ---- safetensors ----------------------------------------------------------------------------------------------

def write_directions_safetensors(path, directions: np.ndarray, kind: str, metadata: dict | None = None) -> Path:
    """Directions [layer, d] as tensors named by hook point (`blocks.{L}.hook_{kind}`), metadata as strings."""
    from safetensors.numpy import save_file

    p, tmp = _atomic_target(path)
    tensors = {hook_name(layer, kind): np.ascontiguousarray(directions[layer], dtype=np.float32)
               for layer in range(directions.shape[0])}
    meta = {"format": "interp-workbench-directions", "hook": kind, **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, p)
    return p


# ---- from a steering_vector result ------------------------------------------------------------------------------

def export_result_gguf(result, path) -> tuple[Path, list[int]]:
    """Write a `steering_vector` result as a llama.cpp control vector; returns (path, our layers left out
    because llama.cpp cannot steer them)."""
    if result.kind != "steering_vector" or list(result.dims) != ["layer", "d_model"]:
        raise SpecError(f"only steering_vector results export as a control vector, not {result.kind}.")
    layers, dropped = llama_cpp_layers(str(result.params.get("hook", "resid_post")), np.asarray(result.values))
    return write_control_vector(path, layers, str(result.params.get("model_type", ""))), dropped


def export_result_safetensors(result, path) -> Path:
    if result.kind != "steering_vector" or list(result.dims) != ["layer", "d_model"]:
        raise SpecError(f"only steering_vector results export as directions, not {result.kind}.")
    meta = {k: result.params[k] for k in ("method", "model_type", "position") if k in result.params}
    return write_directions_safetensors(path, np.asarray(result.values), str(result.params.get("hook", "resid_post")),
                                        meta)


def read_directions_safetensors(path) -> tuple[np.ndarray, str]:
    """(directions [layer, d], hook kind) of a file written by write_directions_safetensors."""
    from safetensors import safe_open

    from desktop_app.engine.hooknames import parse_hook_name

    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"{p} does not exist or is not a file; choose a directions .safetensors file.")
    try:
        with safe_open(str(p), "np") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise SpecError(f"{p} is not a readable safetensors file ({exc.__class__.__name__}); choose a directions "
                        "file exported by Interp Workbench.", details=str(exc)) from exc
    kind = meta.get("hook", "")
    by_layer = {}
    for name, t in tensors.items():
        try:
            layer, k = parse_hook_name(name)
        except ValueError:
            layer, k = None, ""
        if layer is None or k != kind or t.ndim != 1:
            raise SpecError(f"{p} holds {name!r}, which is not a direction of one layer at {kind or 'a hook'}; choose "
                            "a directions file exported by Interp Workbench.")
        by_layer[layer] = t.astype(np.float32)
    if not by_layer:
        raise SpecError(f"{p} holds no directions.")
    widths = {v.shape[0] for v in by_layer.values()}
    if len(widths) != 1:
        raise SpecError(f"{p} mixes directions of widths {sorted(widths)}; it is not one model's.")
    out = np.zeros((max(by_layer) + 1, widths.pop()), dtype=np.float32)
    for layer, v in by_layer.items():
        out[layer] = v
    return out, kind


def directions_file_for(lm, path) -> tuple[np.ndarray, str]:
    """(directions [n_layers, d_model], hook kind) from a control-vector .gguf (resid_post) or a directions
    .safetensors, refused in one sentence when it does not fit this model."""
    p = Path(path).expanduser()
    if p.suffix.lower() == ".gguf":
        return control_vector_as_directions(lm, p), "resid_post"
    directions, kind = read_directions_safetensors(p)
    if directions.shape[1] != lm.info.d_model:
        raise SpecError(f"the directions in {p.name} have width {directions.shape[1]} but this model's d_model is "
                        f"{lm.info.d_model}; use directions made for this model.")
    if directions.shape[0] > lm.info.n_layers:
        raise SpecError(f"{p.name} has directions for {directions.shape[0]} layers but this model has "
                        f"{lm.info.n_layers}; use directions made for this model.")
    out = np.zeros((lm.info.n_layers, lm.info.d_model), dtype=np.float32)
    out[:directions.shape[0]] = directions
    return out, kind
