"""Reading and writing SAEs without pickle: SAELens folders, Gemma Scope params.npz, plain safetensors.

    load_sae(path, hook_name=None)   -> SAE (hook from the file where it names one, else the caller's)
    save_saelens(sae, folder)        -> cfg.json + sae_weights.safetensors that SAELens 6 loads
    check_fits(sae, hook_name, width) raises SAEError when the SAE's input width is not the hook's
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from desktop_app.engine.bounded_io import (BoundedReadError, check_npz, json_error_text, loads_json,
                                          read_regular_bytes)
from desktop_app.engine.errors import SAEError
from desktop_app.engine.file_checks import (nonfinite_problem, not_regular_problem, safetensors_problem,
                                            saelens_cfg_problem)
from desktop_app.engine.sae.model import ARCHITECTURES, SAE, SAEConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SPARSITY_FILE = "sparsity.safetensors"
GEMMA_SCOPE_FILE = "params.npz"
# Written into metadata so that SAELens reads our cfg.json as its current (>= 6) format.
SAELENS_FORMAT_VERSION = "6.0.0"

_DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "float64": torch.float64}


def _torch_dtype(name: Any, where: Path) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    key = str(name or "float32").removeprefix("torch.")
    if key not in _DTYPES:
        raise SAEError(f"{where} asks for dtype {name!r}, which is not supported; use float32, float16 or bfloat16.")
    return _DTYPES[key]


# --- entry point --------------------------------------------------------------------------------------

def load_sae(path: str | os.PathLike, hook_name: str | None = None, *, dtype: Any = None,
             device: str | torch.device = "cpu", k: int | None = None,
             apply_b_dec_to_input: bool | None = None, norm_scaling_factor: float | None = None) -> SAE:
    """Load an SAE from an SAELens folder, a Gemma Scope params.npz (or a folder holding one) or a
    safetensors file. `hook_name` is used when the file names no hook; k / apply_b_dec_to_input only
    matter for files without a config. The SAE is returned in eval mode on `device`."""
    p = Path(path).expanduser()
    problem = not_regular_problem(p)
    if problem:
        raise SAEError(f"SAE path {p} {problem}; choose an SAELens folder, a params.npz or a .safetensors file.")
    if not p.exists():
        raise SAEError(f"SAE path {p} does not exist; choose an SAELens folder, a params.npz or a .safetensors file.")
    if p.is_dir():
        if (p / CFG_FILE).is_file():
            sae = _load_saelens_folder(p, dtype, norm_scaling_factor)
        elif (p / GEMMA_SCOPE_FILE).is_file():
            sae = _load_gemma_scope(p / GEMMA_SCOPE_FILE, hook_name, dtype)
        else:
            raise SAEError(f"Folder {p} is not an SAE: it has neither cfg.json + {WEIGHTS_FILE} (SAELens) nor "
                           f"{GEMMA_SCOPE_FILE} (Gemma Scope); choose the folder that holds those files.")
    elif p.suffix == ".npz":
        sae = _load_gemma_scope(p, hook_name, dtype)
    elif p.suffix == ".safetensors":
        if p.name == WEIGHTS_FILE and (p.parent / CFG_FILE).is_file():
            sae = _load_saelens_folder(p.parent, dtype, norm_scaling_factor)
        else:
            sae = _load_plain_safetensors(p, hook_name, dtype, k, apply_b_dec_to_input)
    else:
        raise SAEError(f"{p} is not an SAE file; choose an SAELens folder, a params.npz or a .safetensors file.")
    if sae.cfg.hook_name is None and hook_name:
        sae.cfg.hook_name = hook_name
        if hook_name.endswith("hook_z"):
            sae.cfg.reshape_activations = "hook_z"
    sae.source_path = p
    return sae.to(device).eval()


def require_hook(sae: SAE, hook_name: str | None = None) -> str:
    """The hook an SAE reads: the caller's when given, else the one its file names."""
    hook = hook_name or sae.cfg.hook_name
    if not hook:
        where = getattr(sae, "source_path", "this SAE")
        raise SAEError(f"{where} does not say which hook point it reads; give one, e.g. \"hook\": "
                       "\"blocks.6.hook_resid_post\".")
    return hook


def check_fits(sae: SAE, hook_name: str, width: int | tuple | list) -> None:
    """Raise when the SAE's input width differs from the hook's activation width. `width` may be the
    hook's shape without batch/position (for hook_z, (n_heads, d_head) is flattened)."""
    if isinstance(width, (tuple, list)):
        dims = [int(d) for d in width]
        width = int(np.prod(dims[-2:])) if hook_name.endswith("hook_z") and len(dims) >= 2 else dims[-1]
    if int(width) != sae.d_in:
        where = getattr(sae, "source_path", None) or "The SAE"
        raise SAEError(f"{where} reads activations of width {sae.d_in} (trained on "
                       f"{sae.cfg.hook_name or 'an unnamed hook'}) but {hook_name} of this model has width "
                       f"{int(width)}; choose an SAE trained on this model.")


# --- SAELens ------------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        cfg = loads_json(read_regular_bytes(path, 16 * 2**20))
    except (OSError, ValueError) as exc:  # ValueError: JSON, UTF-8 and the bounded reader's limits
        raise SAEError(f"{path} {json_error_text(exc)}; repair or replace it.") from exc
    if not isinstance(cfg, dict):
        raise SAEError(f"{path} does not hold a JSON object; it is not an SAELens cfg.json.")
    return cfg


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    problem = safetensors_problem(path)
    if problem:
        raise SAEError(f"Cannot read {path}: it is not a valid safetensors file (it {problem}); copy it again.")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types and OSError for bad files
        raise SAEError(f"Cannot read {path}: it is not a valid safetensors file (corrupt or truncated); "
                       "copy it again.", details=str(exc)) from exc


def _cfg_from_saelens_dict(raw: dict, where: Path) -> tuple[dict, dict]:
    """Normalise a cfg.json of any SAELens version into SAEConfig fields + extra metadata."""
    problem = saelens_cfg_problem(raw)
    if problem:
        raise SAEError(f"{where} {problem}; repair the SAE's cfg.json.")
    meta = dict(raw.get("metadata") or raw.get("meta") or {})
    hook = meta.get("hook_name") or raw.get("hook_name") or raw.get("hook_point")
    act_fn = raw.get("activation_fn") or raw.get("activation_fn_str")
    act_kwargs = raw.get("activation_fn_kwargs") or {}
    arch = raw.get("architecture") or ("topk" if act_fn == "topk" else "standard")
    if arch not in ARCHITECTURES:
        raise SAEError(f"{where} has architecture {arch!r}, which is not supported; use an SAE of type "
                       f"{', '.join(ARCHITECTURES)}.")
    k = raw.get("k", act_kwargs.get("k"))
    norm = raw.get("normalize_activations")
    assumed = _assumed_saelens_settings(raw, where)
    if isinstance(norm, bool) or norm is None:  # pre-6 configs stored a flag
        norm = "expected_average_only_in" if norm else "none"
    for key in ("d_in", "d_sae"):
        if not isinstance(raw.get(key), int):
            raise SAEError(f"{where} lacks an integer {key!r}; it is not a complete SAELens cfg.json.")
    fields = dict(
        architecture=arch, d_in=raw["d_in"], d_sae=raw["d_sae"], hook_name=hook,
        k=int(k) if k is not None else None,
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        norm_scaling_factor=raw.get("norm_scaling_factor"),
        rescale_acts_by_decoder_norm=bool(raw.get("rescale_acts_by_decoder_norm", False)),
        reshape_activations=raw.get("reshape_activations") or "none",
        dtype=str(raw.get("dtype", "float32")).removeprefix("torch."),
    )
    for key in ("model_name", "hook_head_index", "prepend_bos", "context_size", "dataset_path", "neuronpedia_id"):
        if key not in meta and raw.get(key) is not None:
            meta[key] = raw[key]
    meta.pop("hook_name", None)
    fields["assumptions"] = assumed
    return fields, meta


def _assumed_saelens_settings(raw: dict, where: Path) -> list[str]:
    """What a cfg.json leaves unstated that changes the SAE's output, as sentences saying what is assumed."""
    assumed = []
    if "normalize_activations" not in raw:
        assumed.append(f"{where} does not state normalize_activations; assumed none (the SAE reads raw activations).")
    elif raw["normalize_activations"] in (True, "expected_average_only_in") and raw.get("norm_scaling_factor") is None:
        assumed.append(f"{where} sets normalize_activations to expected_average_only_in without a norm_scaling_factor; "
                       "assumed the factor is folded into the weights (scale 1), as SAELens does on save.")
    if "apply_b_dec_to_input" not in raw:
        assumed.append(f"{where} does not state apply_b_dec_to_input; assumed true (b_dec is subtracted first).")
    return assumed


def _load_saelens_folder(folder: Path, dtype: Any, norm_scaling_factor: float | None) -> SAE:
    raw = _read_json(folder / CFG_FILE)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise SAEError(f"Folder {folder} has a cfg.json but no {WEIGHTS_FILE}; copy the weights file next to it.")
    fields, meta = _cfg_from_saelens_dict(raw, folder / CFG_FILE)
    if norm_scaling_factor is not None:
        fields["norm_scaling_factor"] = float(norm_scaling_factor)
        fields["assumptions"] = [a for a in fields["assumptions"] if "norm_scaling_factor" not in a]
    cfg = SAEConfig(**fields, metadata=meta)
    state = _read_safetensors(weights_path)
    sae = _build(cfg, state, weights_path, _torch_dtype(dtype or cfg.dtype, folder / CFG_FILE))
    sparsity_path = folder / SPARSITY_FILE
    if sparsity_path.is_file():
        sparsity = _read_safetensors(sparsity_path)
        if "sparsity" in sparsity and sparsity["sparsity"].numel() == cfg.d_sae:
            sae.log_sparsity = sparsity["sparsity"].float().reshape(-1)
    return sae


def _expected_shapes(cfg: SAEConfig) -> dict[str, tuple]:
    d_in, d_sae = cfg.d_in, cfg.d_sae
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if cfg.architecture == "gated":
        shapes.update(b_gate=(d_sae,), r_mag=(d_sae,), b_mag=(d_sae,))
    else:
        shapes["b_enc"] = (d_sae,)
    if cfg.architecture == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def _build(cfg: SAEConfig, state: dict[str, torch.Tensor], where: Path, dtype: torch.dtype) -> SAE:
    state = dict(state)
    if "log_threshold" in state and "threshold" not in state:  # SAELens training checkpoints
        state["threshold"] = state.pop("log_threshold").exp()
    finetune = state.pop("finetuning_scaling_factor", state.pop("scaling_factor", None))
    problem = nonfinite_problem(state)
    if problem:
        raise SAEError(f"{where} {problem}; the SAE is damaged, so use another copy of it.")
    for name, shape in _expected_shapes(cfg).items():
        if name not in state:
            raise SAEError(f"{where} has no tensor {name!r}, which a {cfg.architecture} SAE needs; "
                           "it is not a complete SAE weights file.")
        if tuple(state[name].shape) != shape:
            raise SAEError(f"{name} in {where} has shape {tuple(state[name].shape)} but the config says "
                           f"d_in={cfg.d_in}, d_sae={cfg.d_sae} (expected {shape}); the weights and config "
                           "do not belong together.")
    sae = SAE(cfg, dtype=dtype)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            param.copy_(state[name].to(dtype))
    if finetune is not None and not torch.allclose(finetune.float(), torch.ones_like(finetune.float())):
        sae.fold_finetuning_scale(finetune)
    return sae


# --- Gemma Scope and plain safetensors ----------------------------------------------------------------

def _load_gemma_scope(path: Path, hook_name: str | None, dtype: Any) -> SAE:
    try:
        check_npz(path)
        with np.load(path, allow_pickle=False) as data:
            arrays = {("W_" + key[2:] if key.startswith("w_") else key): np.asarray(data[key]) for key in data.files}
    except BoundedReadError as exc:
        raise SAEError(f"Cannot read {path}: {exc}; use a params.npz of plain number arrays.") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise SAEError(f"Cannot read {path}: it is not a valid params.npz (corrupt, truncated or holding "
                       "pickled objects); copy it again.", details=str(exc)) from exc
    state = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in arrays.items()}
    arch = "jumprelu" if "threshold" in state else "standard"
    sae = _from_bare_state(state, path, hook_name, dtype, arch, k=None, apply_b_dec_to_input=False)
    sae.cfg.assumptions = [f"{path} states no normalisation and no b_dec handling; assumed raw activations and "
                           "apply_b_dec_to_input false, as Gemma Scope SAEs are trained."]
    return sae


def _load_plain_safetensors(path: Path, hook_name: str | None, dtype: Any, k: int | None,
                            apply_b_dec_to_input: bool | None) -> SAE:
    state = _read_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception:
        header = {}
    hook_name = header.get("hook_name") or hook_name
    if "k" in header and k is None:
        k = int(header["k"])
    arch = header.get("architecture") or (
        "jumprelu" if "threshold" in state or "log_threshold" in state
        else "gated" if "b_gate" in state else "topk" if k is not None else "standard")
    assumed = []
    if apply_b_dec_to_input is None:
        flag = header.get("apply_b_dec_to_input")
        # jumprelu weights without a config are almost always Gemma Scope, which does not subtract b_dec
        apply_b_dec_to_input = (flag.lower() == "true") if flag is not None else arch != "jumprelu"
        if flag is None:
            assumed.append(f"{path} does not state apply_b_dec_to_input; assumed "
                           f"{str(apply_b_dec_to_input).lower()} for a {arch} SAE.")
    if "normalize_activations" not in header:
        assumed.append(f"{path} states no normalisation; assumed none (the SAE reads raw activations).")
    sae = _from_bare_state(state, path, hook_name, dtype, arch, k, apply_b_dec_to_input)
    sae.cfg.assumptions = assumed
    return sae


def _from_bare_state(state: dict, path: Path, hook_name: str | None, dtype: Any, arch: str, k: int | None,
                     apply_b_dec_to_input: bool) -> SAE:
    if "W_enc" not in state or state["W_enc"].dim() != 2:
        raise SAEError(f"{path} has no 2-D tensor 'W_enc'; it is not an SAE weights file "
                       "(expected W_enc, W_dec, b_enc, b_dec).")
    d_in, d_sae = (int(d) for d in state["W_enc"].shape)
    cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, hook_name=hook_name, k=k,
                    apply_b_dec_to_input=apply_b_dec_to_input)
    return _build(cfg, state, path, _torch_dtype(dtype or "float32", path))


# --- saving -------------------------------------------------------------------------------------------

def saelens_cfg_dict(sae: SAE) -> dict:
    cfg = sae.cfg
    out: dict[str, Any] = {
        "architecture": cfg.architecture, "d_in": cfg.d_in, "d_sae": cfg.d_sae,
        "dtype": str(sae.dtype).removeprefix("torch."), "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": cfg.normalize_activations,
        "reshape_activations": cfg.reshape_activations,
        "hook_name": cfg.hook_name,  # older readers look for it at the top level
        "metadata": {**cfg.metadata, "hook_name": cfg.hook_name,
                     "sae_lens_version": cfg.metadata.get("sae_lens_version", SAELENS_FORMAT_VERSION),
                     "sae_lens_training_version": cfg.metadata.get("sae_lens_training_version",
                                                                   SAELENS_FORMAT_VERSION)},
    }
    if cfg.architecture == "topk":
        out["k"] = int(cfg.k)
        out["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    return out


def _atomic_write(path: Path, write) -> None:
    """write(tmp) into a new, uniquely named file beside `path` (O_EXCL: never through a planted symlink),
    fsync, rename over `path`; a failure or a kill leaves the previous file in place."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    while True:
        tmp = path.with_name(f".iwb-save-{os.urandom(8).hex()}.tmp")
        try:
            os.close(os.open(tmp, flags, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def save_saelens(sae: SAE, folder: str | os.PathLike, sparsity: torch.Tensor | None = None) -> Path:
    """Write the SAE as an SAELens folder. An expected_average_only_in scaling factor is folded into the
    weights first (SAELens has no place for it), so the saved SAE computes the same function."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = copy.deepcopy(sae).cpu().fold_scaling_factor()
    state = {name: p.detach().contiguous() for name, p in out.state_dict().items()}
    _atomic_write(folder / WEIGHTS_FILE, lambda t: save_file(state, str(t)))
    text = json.dumps(saelens_cfg_dict(out), indent=2)
    _atomic_write(folder / CFG_FILE, lambda t: t.write_text(text, encoding="utf-8"))
    log_sparsity = sparsity if sparsity is not None else sae.log_sparsity
    if log_sparsity is not None:
        tensor = {"sparsity": log_sparsity.detach().float().cpu().contiguous()}
        _atomic_write(folder / SPARSITY_FILE, lambda t: save_file(tensor, str(t)))
    return folder
