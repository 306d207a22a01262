"""Pooled activations of many texts at one hook kind of every layer, batched, with an on-disk cache.

    acts = yield from collect_pooled(lm, texts, "resid_post", pooling="last", cache_dir=dir, cancel=cancel)
    acts  # float32 numpy [layer, text, width]

Texts are tokenised with the model's own defaults and right-padded within a batch. No attention mask is
needed: in a causal model a real token never attends to a later one, so padding after it cannot change its
activations; pooling reads only positions < length ("last" = position length - 1, "mean" = the mean over
the text's tokens after a leading BOS token). The cache is one .npy file (allow_pickle=False) per (model fingerprint, hook kind,
pooling, tokenisation, texts); a changed weights file changes the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.conformance import require_for_hook
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Progress

POOLINGS = ("last", "mean")
LAYER_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
CACHE_VERSION = 2


def default_cache_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("interp-workbench", appauthor=False)) / "activations"


def check_layer_kind(lm, kind: str) -> str:
    """The short hook kind (resid_post, ...) of a layer-wise analysis; SpecError for another."""
    kind = (kind or "").strip()
    if kind.startswith("hook_"):
        kind = kind[len("hook_"):]
    if kind not in LAYER_KINDS:
        raise SpecError(f"hook {kind!r} cannot be pooled to one vector per text; use one of {', '.join(LAYER_KINDS)}.")
    if kind == "resid_mid" and lm.info.parallel_attn_mlp:
        raise SpecError("resid_mid does not exist in this model (attention and MLP run in parallel); use resid_pre "
                        "or resid_post.")
    return kind


def pad_id(lm) -> int:
    tok = lm.tokenizer
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tok, attr, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_texts(lm, texts: list[str], prepend_bos: bool | None = None, what: str = "text") -> list[list[int]]:
    """Token ids per text; PromptError naming the first text longer than the model's context."""
    out = []
    for i, text in enumerate(texts):
        try:
            out.append(list(lm.tokenize(text, prepend_bos, what=f"{what} {i + 1}").ids))
        except PromptError as err:
            raise PromptError(f"{err} ({text[:40]!r}{'...' if len(text) > 40 else ''})") from err
    return out


def padded(docs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, L] right-padded with `pad`, lengths [B])."""
    width = max(len(d) for d in docs)
    ids = torch.full((len(docs), width), int(pad), dtype=torch.long)
    for row, doc in enumerate(docs):
        ids[row, :len(doc)] = torch.tensor(doc, dtype=torch.long)
    return ids, torch.tensor([len(d) for d in docs], dtype=torch.long)


def pool(act: torch.Tensor, lengths: torch.Tensor, pooling: str, starts: torch.Tensor | None = None) -> torch.Tensor:
    """[B, L, d] -> [B, d] reading only positions starts <= p < length (starts: 0 unless given)."""
    lengths = lengths.to(act.device)
    if pooling == "last":
        return act[torch.arange(act.shape[0], device=act.device), lengths - 1]
    starts = torch.zeros_like(lengths) if starts is None else starts.to(act.device)
    pos = torch.arange(act.shape[1], device=act.device)[None, :]
    mask = ((pos < lengths[:, None]) & (pos >= starts[:, None])).to(act.dtype)
    return (act * mask[..., None]).sum(1) / (lengths - starts)[:, None].to(act.dtype)


def mean_starts(lm, docs: list[list[int]]) -> torch.Tensor:
    """Where the mean over a text's tokens starts: after a leading BOS (an outlier activation in most models)
    unless the BOS is the text's only token."""
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    return torch.tensor([1 if bos is not None and len(d) > 1 and d[0] == bos else 0 for d in docs],
                        dtype=torch.long)


def model_fingerprint(lm) -> str:
    """Identifies the weights as loaded: path, config hash, dtype, quantisation, and size + mtime of the weight
    files (the same files loaded as int8 give other activations)."""
    parts = [str(getattr(lm, "path", "")), str(getattr(lm, "config_hash", "")), str(lm.info.dtype),
             str(lm.info.quantize)]
    p = Path(str(getattr(lm, "path", "")))
    files = [p] if p.is_file() else (sorted(q for q in p.iterdir() if q.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
                                     if p.is_dir() else [])
    for f in files:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def cache_key(lm, kind: str, pooling: str, docs: list[list[int]]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, model_fingerprint(lm), kind, pooling, lm.info.n_layers]).encode())
    for d in docs:
        h.update(np.asarray(d, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:32]


def _load_cached(path: Path, shape: tuple[int, ...]):
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return arr if arr.shape == shape and arr.dtype == np.float32 else None


def _save_cached(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)
    os.replace(tmp, path)


def collect_pooled(lm, texts: list[str], kind: str = "resid_post", pooling: str = "last", batch_size: int = 16,
                   cache_dir=None, cancel: CancelToken | None = None, prepend_bos: bool | None = None,
                   what: str = "text"):
    """Job: float32 numpy [layer, text, width] of `kind` at every layer, pooled per text."""
    cancel = cancel or CancelToken()
    kind = check_layer_kind(lm, kind)
    if pooling not in POOLINGS:
        raise SpecError(f"position {pooling!r} is unknown; use last or mean.")
    if not texts:
        raise SpecError(f"there are no {what}s to run; give at least one.")
    require_for_hook(lm, hook_name(0, kind), f"reading {kind} activations", restarts=False)
    docs = tokenize_texts(lm, list(texts), prepend_bos, what)
    n_layers, width = lm.info.n_layers, lm.info.d_model
    shape = (n_layers, len(docs), width)
    cache_path = None
    if cache_dir is not None:
        cache_path = Path(cache_dir) / f"{cache_key(lm, kind, pooling, docs)}.npy"
        if cache_path.is_file():
            cached = _load_cached(cache_path, shape)
            if cached is not None:
                yield Progress(1, 1, f"activations at {kind} from the cache")
                return cached
    names = [hook_name(layer, kind) for layer in range(n_layers)]
    out = np.zeros(shape, dtype=np.float32)
    batch_size = max(1, int(batch_size))
    order = sorted(range(len(docs)), key=lambda i: len(docs[i]))  # similar lengths together: less padding
    n_batches = (len(docs) + batch_size - 1) // batch_size
    pad = pad_id(lm)
    for b in range(n_batches):
        cancel.check()
        rows = order[b * batch_size:(b + 1) * batch_size]
        yield Progress(b, n_batches, f"activations at {kind}: batch {b + 1} of {n_batches}")
        ids, lengths = padded([docs[i] for i in rows], pad)
        starts = mean_starts(lm, [docs[i] for i in rows])
        with torch.inference_mode(), hooks(lm, read=names, cancel=cancel) as store:
            forward_logits(lm, ids, last_only=True)
            for layer, name in enumerate(names):
                out[layer, rows] = pool(store[name].float(), lengths, pooling, starts).cpu().numpy()
    yield Progress(n_batches, n_batches, f"activations at {kind}: done")
    if cache_path is not None:
        _save_cached(cache_path, out)
    return out
