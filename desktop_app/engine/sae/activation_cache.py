"""Per-token activations at one hook over a corpus, collected once and kept on disk for SAE training,
dashboards and metrics (pooled per-text activations for probes live in engine/activations_dataset.py).

    docs = corpus.tokenize_documents(lm, texts, context)
    cache = yield from collect_activations_cached(lm, hook, docs, context, cache_dir=None)  # a job
    rows = cache.rows(skip_ids=corpus.special_ids(lm))   # random access for training, memory-mapped
    x = cache.doc_batch(0, 16)                             # [16, longest, width] for dashboards

The folder is keyed by the model's fingerprint (its config hash and a sample + sum of every parameter), the
hook, a hash of the corpus's token ids (text, tokenizer and context cut in one) and the context length;
changing any of them gives another folder. Each shard is two .npy files written atomically (float32
activations [tokens, width], int32 token ids), and manifest.json lists the finished shards and how many
documents they cover; a cancelled or crashed collection keeps its shards and a later one resumes after them.
Memory stays bounded by one shard (SHARD_BYTES) plus one batch. The forward pass stops after the block that
produces the hook: later layers are never computed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from desktop_app.engine.capture import as_ids, forward_logits, hooks
from desktop_app.engine.errors import JobCancelled, SAEError
from desktop_app.engine.hooknames import EMBED, parse_hook_name
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.sae import corpus as corpus_mod

CACHE_ENV = "INTERP_WORKBENCH_CACHE_DIR"
APP_NAME = "interp-workbench"
FORMAT = 1
SHARD_BYTES = 64 << 20
MANIFEST = "manifest.json"


def default_cache_dir() -> Path:
    """INTERP_WORKBENCH_CACHE_DIR if set, else platformdirs' user cache dir, + /activations."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser() / "activations"
    import platformdirs
    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False)) / "activations"


# ---- keys ------------------------------------------------------------------------------------------------

@torch.no_grad()
def model_fingerprint(lm) -> str:
    """A hash of the model's config hash and, per parameter, its name, shape, dtype, sum and a strided sample
    of its values: fine-tuned or differently seeded weights give another fingerprint."""
    h = hashlib.sha256(str(getattr(lm, "config_hash", "") or "").encode())
    for name, p in list(lm.model.named_parameters()) + list(lm.model.named_buffers()):
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        if p.device.type == "meta" or p.numel() == 0:
            continue
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        h.update(flat[::step][:1024].float().cpu().numpy().tobytes())
        h.update(np.float64(torch.sum(flat, dtype=torch.float64).item()).tobytes())
    return h.hexdigest()[:24]


def corpus_hash(docs: list[list[int]]) -> str:
    """A hash of the documents' token ids and their boundaries."""
    h = hashlib.sha256()
    h.update(np.array([len(d) for d in docs], dtype=np.int64).tobytes())
    for d in docs:
        h.update(np.asarray(d, dtype=np.int64).tobytes())
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class CacheKey:
    model: str
    hook: str
    corpus: str
    context: int
    format: int = FORMAT

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:32]


# ---- the cache on disk -----------------------------------------------------------------------------------

def _atomic_write_bytes(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
    _atomic_write_bytes(path, write)


class ActivationCache:
    """A finished (or partly finished) cache folder."""

    def __init__(self, folder: Path, manifest: dict):
        self.folder = Path(folder)
        self.manifest = manifest

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    @property
    def width(self) -> int:
        return int(self.manifest["width"])

    @property
    def n_tokens(self) -> int:
        return sum(int(s["n_tokens"]) for s in self.manifest["shards"])

    @property
    def doc_lengths(self) -> list[int]:
        return [int(n) for n in self.manifest["doc_lengths"][:self.manifest["docs_done"]]]

    def _arrays(self, kind: str) -> list[np.ndarray]:
        return [np.load(self.folder / s[kind], mmap_mode="r", allow_pickle=False) for s in self.manifest["shards"]]

    def rows(self, skip_ids=()) -> "ActivationRows":
        return ActivationRows(self._arrays("acts"), self._arrays("ids"), skip_ids)

    def doc_batch(self, start: int, end: int) -> torch.Tensor:
        """Activations of documents start..end-1 as [n, longest, width] float32, zero-padded on the right."""
        lengths = self.doc_lengths
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        if getattr(self, "_all_rows", None) is None or len(self._all_rows) != self.n_tokens:
            self._all_rows = self.rows()  # memory maps opened once, not per batch
        rows = self._all_rows
        width = max(lengths[start:end])
        out = torch.zeros(end - start, width, self.width)
        for i, d in enumerate(range(start, end)):
            out[i, :lengths[d]] = rows.rows(torch.arange(int(offsets[d]), int(offsets[d + 1])))
        return out


class ActivationRows:
    """Random access to the cached rows, optionally without the rows of some token ids (BOS / EOS ...)."""

    def __init__(self, acts: list[np.ndarray], ids: list[np.ndarray], skip_ids=()):
        self._acts = acts
        self._offsets = np.concatenate([[0], np.cumsum([a.shape[0] for a in acts])]).astype(np.int64)
        self.width = int(acts[0].shape[1]) if acts else 0
        self._keep = None
        skip = np.array(sorted(int(i) for i in skip_ids), dtype=np.int64)
        if skip.size:
            keep = [np.nonzero(~np.isin(i, skip))[0] + off for i, off in zip(ids, self._offsets)]
            self._keep = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._offsets[-1]) if self._keep is None else int(self._keep.size)

    @property
    def shape(self) -> tuple[int, int]:
        return len(self), self.width

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), width] of the rows at `index` (into this view)."""
        g = index.numpy().astype(np.int64) if isinstance(index, torch.Tensor) else np.asarray(index, np.int64)
        if self._keep is not None:
            g = self._keep[g]
        out = np.empty((g.size, self.width), dtype=np.float32)
        shard = np.searchsorted(self._offsets, g, side="right") - 1
        for s in np.unique(shard):
            at = shard == s
            out[at] = self._acts[s][g[at] - self._offsets[s]]
        return torch.from_numpy(out)

    def chunks(self, size: int = 8192):
        for start in range(0, len(self), size):
            yield self.rows(torch.arange(start, min(start + size, len(self))))


# ---- collection ------------------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def _stop_module(lm, hook: str):
    """The module whose forward pre-hook comes after `hook` has been produced (None: run to the end)."""
    layer, kind = parse_hook_name(hook)
    blocks = lm.adapter.blocks
    if kind == EMBED:
        return blocks[0]
    if layer is None:
        return None
    return blocks[layer + 1] if layer + 1 < len(blocks) else lm.adapter.final_norm


def _capture(lm, hook: str, ids: torch.Tensor, cancel: CancelToken) -> torch.Tensor:
    """Activations at `hook` [B, L, width] (float32, CPU) of one batch; stops the forward pass right after."""
    stop = _stop_module(lm, hook)

    def raise_stop(_mod, _args):
        raise _Stop()

    with torch.inference_mode(), hooks(lm, read=[hook], cancel=cancel, to_cpu=True) as store:
        handle = stop.register_forward_pre_hook(raise_stop) if stop is not None else None
        try:
            forward_logits(lm, as_ids(ids))
        except _Stop:
            pass
        finally:
            if handle is not None:
                handle.remove()
        act = store[hook]
    return act.float().reshape(*act.shape[:2], -1)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h {s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m {s % 60:02d}s" if s >= 60 else f"{s}s"


def _read_manifest(folder: Path, key: CacheKey) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("key") != asdict(key):
        return None
    for shard in manifest.get("shards", []):
        if not all((folder / shard[k]).is_file() for k in ("acts", "ids")):
            return None
    return manifest


def open_cache(lm, hook: str, docs: list[list[int]], context: int, cache_dir=None) -> tuple[ActivationCache, bool]:
    """The cache folder for these inputs (created empty if new) and whether it already holds every document."""
    key = CacheKey(model=model_fingerprint(lm), hook=hook, corpus=corpus_hash(docs), context=int(context))
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folder = folder / key.digest()
    manifest = _read_manifest(folder, key)
    if manifest is None:
        if folder.exists():
            shutil.rmtree(folder)  # a foreign, corrupt or unfinished-with-missing-shards folder: start again
        folder.mkdir(parents=True)
        manifest = {"key": asdict(key), "width": None, "docs_done": 0, "doc_lengths": [len(d) for d in docs],
                    "shards": [], "complete": False}
    return ActivationCache(folder, manifest), bool(manifest["complete"])


def collect_activations_cached(lm, hook: str, docs: list[list[int]], context: int, *, cache_dir=None,
                               batch_size: int = 16, cancel: CancelToken | None = None,
                               shard_bytes: int = SHARD_BYTES):
    """Job: the ActivationCache of `hook` over `docs`, computing only the documents not cached yet. On cancel
    the finished batches are written before JobCancelled propagates."""
    from desktop_app.engine.conformance import require_for_hook

    cancel = cancel or CancelToken()
    lm.hook_point(hook)
    require_for_hook(lm, hook, f"collecting activations at {hook}", restarts=False)
    if not docs:
        raise SAEError("The corpus gives no tokens; add some text to it.")
    cache, complete = open_cache(lm, hook, docs, context, cache_dir)
    if complete:
        yield Progress(1, 1, f"activations at {hook}: {cache.n_tokens} tokens read from the cache")
        return cache
    manifest = cache.manifest
    start_doc = int(manifest["docs_done"])
    total_tokens = sum(len(d) for d in docs)
    done_tokens = sum(len(d) for d in docs[:start_doc])
    buffer_acts, buffer_ids, buffered_docs = [], [], 0
    pad_id = next(iter(sorted(corpus_mod.special_ids(lm))), 0)
    started, computed = time.perf_counter(), 0

    def flush():
        nonlocal buffer_acts, buffer_ids, buffered_docs
        if not buffer_acts:
            return
        n = len(manifest["shards"])
        acts = np.concatenate(buffer_acts).astype(np.float32, copy=False)
        names = {"acts": f"acts_{n:05d}.npy", "ids": f"ids_{n:05d}.npy"}
        _save_npy(cache.folder / names["acts"], acts)
        _save_npy(cache.folder / names["ids"], np.concatenate(buffer_ids).astype(np.int32))
        manifest["shards"].append({**names, "n_tokens": int(acts.shape[0]), "n_docs": buffered_docs})
        manifest["docs_done"] = int(manifest["docs_done"]) + buffered_docs
        manifest["width"] = int(acts.shape[1])
        manifest["complete"] = manifest["docs_done"] >= len(docs)
        text = json.dumps(manifest)
        _atomic_write_bytes(cache.folder / MANIFEST, lambda t: t.write_text(text, encoding="utf-8"))
        buffer_acts, buffer_ids, buffered_docs = [], [], 0

    n_batches = (len(docs) - start_doc + batch_size - 1) // batch_size
    try:
        for b, (_, ids, lengths) in enumerate(corpus_mod.padded_batches(docs[start_doc:], batch_size, pad_id)):
            cancel.check()
            if b == 0 or computed == 0:
                eta = ""
            else:
                rate = computed / (time.perf_counter() - started)
                eta = f", about {_fmt_seconds((total_tokens - done_tokens) / rate)} left"
            yield Progress(done_tokens, total_tokens, f"activations at {hook}: batch {b + 1} of {n_batches}{eta}")
            act = _capture(lm, hook, ids, cancel)
            for row, n in enumerate(lengths.tolist()):
                buffer_acts.append(act[row, :n].numpy())
                buffer_ids.append(ids[row, :n].numpy())
            buffered_docs += len(lengths)
            done_tokens += int(lengths.sum())
            computed += int(lengths.sum())
            if sum(a.nbytes for a in buffer_acts) >= shard_bytes:
                flush()
        flush()
    except JobCancelled:
        flush()
        raise
    yield Progress(total_tokens, total_tokens, f"activations at {hook}: {total_tokens} tokens cached")
    return cache
