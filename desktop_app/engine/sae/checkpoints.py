"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint is a folder `ckpt-{step:08d}` holding state.safetensors (SAE parameters, Adam moments and step
counts, the random generator's state, the data order, per-feature 'tokens since fired', the BatchTopK
threshold estimate) and state.json (the config, the step, the data cursor, the input scale and the logged
history). Both are written to a temporary folder that is renamed into place, so a crash mid-write leaves the
previous checkpoint intact. Only the newest KEEP checkpoints are kept. No pickle anywhere.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from desktop_app.engine.errors import SAEError

KEEP = 2
STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
# fields that may change between a run and its resumption without changing what is computed
FREE_FIELDS = ("log_every", "checkpoint_every", "steps")


def checkpoint_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("ckpt-")
                  and (p / STATE_JSON).is_file() and (p / STATE_TENSORS).is_file())


def latest_checkpoint(path) -> Path:
    """`path` itself when it is a checkpoint folder, else the newest checkpoint inside it."""
    p = Path(path).expanduser()
    if (p / STATE_JSON).is_file():
        return p
    found = checkpoint_folders(p)
    if not found:
        raise SAEError(f"{p} holds no training checkpoint (ckpt-* folders with {STATE_JSON}); choose the "
                       "checkpoints folder of an earlier run.")
    return found[-1]


def save_checkpoint(root: Path, step: int, tensors: dict[str, torch.Tensor], info: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"ckpt-{step:08d}"
    tmp = root / f".tmp-ckpt-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / STATE_TENSORS))
    (tmp / STATE_JSON).write_text(json.dumps(info), encoding="utf-8")
    for name in (STATE_TENSORS, STATE_JSON):
        with open(tmp / name, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_folders(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path, cfg) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, info) of a checkpoint, refused when it was made with a config that computes differently."""
    folder = latest_checkpoint(path)
    try:
        info = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / STATE_TENSORS))
    except Exception as exc:  # safetensors / json raise their own types for damaged files
        raise SAEError(f"Cannot read the checkpoint {folder} ({exc.__class__.__name__}); resume from an "
                       "earlier one or start again.", details=str(exc)) from exc
    saved, now = info.get("config", {}), asdict(cfg)
    for key, value in now.items():
        if key not in FREE_FIELDS and saved.get(key) != value:
            raise SAEError(f"The checkpoint {folder} was made with {key}={saved.get(key)!r} but this run has "
                           f"{key}={value!r}; resume with the same settings or start a new run.")
    if int(info.get("step", 0)) > cfg.steps:
        raise SAEError(f"The checkpoint {folder} is at step {info['step']}, past this run's {cfg.steps} steps; "
                       "give at least that many steps.")
    return tensors, info
