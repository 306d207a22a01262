"""Feature dashboards: per feature its top activating contexts, activation histogram, density and the output
tokens its decoder direction promotes / suppresses. Built by one pass over a local corpus.

One implementation serves SAEs and transcoders: `scan_corpus` takes the function that encodes a batch, and
`direction_token_effects` the decoder directions in the residual stream.

Output tokens: the decoder row W_dec[i] (through the attention output projection for hook_z SAEs, bias removed)
is multiplied elementwise by the final norm's weight (1 + weight for Gemma-style norms), centred first when the
final norm is a LayerNorm, and read out by the unembedding matrix. The final norm's division by the residual's
scale is left out: it is a positive factor per token and does not change which tokens rank highest.

torch is imported inside the job only: the window imports FeatureDashboard and search without it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from desktop_app.engine.jobs import CancelToken, Progress

# Activations differ by orders of magnitude between models: fixed log-spaced bins cover 1e-3 .. 1e3.
HIST_EDGES = np.logspace(-3, 3, 49)


@dataclass
class TopContext:
    tokens: list[str]  # display strings of the window
    max_index: int  # index into tokens of the most activating token
    activation: float
    activations: list[float]  # the feature's activation at each token of the window
    document: int = -1
    position: int = -1  # of the max token in its document


@dataclass
class FeatureDashboard:
    feature: int
    layer: int | None = None  # a transcoder feature's layer (None for an SAE's)
    max_activation: float = 0.0
    density: float = 0.0  # fraction of tokens on which the feature is active
    n_tokens: int = 0
    top_contexts: list[TopContext] = field(default_factory=list)
    histogram_counts: list[int] = field(default_factory=list)
    histogram_edges: list[float] = field(default_factory=list)
    promoted: list[tuple[str, float]] = field(default_factory=list)  # (token, logit effect), largest first
    suppressed: list[tuple[str, float]] = field(default_factory=list)  # most negative first
    # what the promoted / suppressed tokens are read from when it is not the feature's one decoder row (a cross-layer
    # transcoder feature's rows summed over the layers it writes into); empty otherwise
    output_note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["promoted"] = [[t, float(v)] for t, v in self.promoted]
        d["suppressed"] = [[t, float(v)] for t, v in self.suppressed]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FeatureDashboard":
        d = dict(d)
        d["top_contexts"] = [TopContext(**c) for c in d.get("top_contexts", [])]
        d["promoted"] = [(str(t), float(v)) for t, v in d.get("promoted", [])]
        d["suppressed"] = [(str(t), float(v)) for t, v in d.get("suppressed", [])]
        return cls(**d)


def search(dashboards: list[FeatureDashboard], text: str) -> list[FeatureDashboard]:
    """Dashboards whose id equals `text`, or whose top contexts or promoted tokens contain it (case-blind;
    the shown '·' of a space matches a typed space)."""
    needle = (text or "").strip().lower()
    if not needle:
        return list(dashboards)
    found = []
    for d in dashboards:
        hay = [str(d.feature)] if needle.isdigit() else []
        if hay and hay[0] == needle:
            found.append(d)
            continue
        words = ["".join(c.tokens) for c in d.top_contexts] + [t for t, _ in d.promoted]
        if any(needle in w.lower().replace("·", " ") or needle in w.lower() for w in words):
            found.append(d)
    return found


# ---- output tokens ---------------------------------------------------------------------------------------

def output_token_effects(lm, sae, features: list[int], n: int = 10):
    """Per feature the n most promoted and n most suppressed output tokens: [(promoted, suppressed)]."""
    import torch

    from desktop_app.engine.hooknames import parse_hook_name

    a = lm.adapter
    dirs = sae.W_dec.detach().float().cpu()[features]  # [n_feat, d_in]
    layer, kind = parse_hook_name(sae.cfg.hook_name) if sae.cfg.hook_name else (None, "")
    if dirs.shape[-1] != a.unembed.weight.shape[-1]:
        if kind != "attn.hook_z" or layer is None:
            return [([], []) for _ in features]
        o_proj = a.o_proj(layer)
        dev = next(o_proj.parameters()).device
        dtype = next(o_proj.parameters()).dtype
        with torch.inference_mode():
            dirs = (o_proj(dirs.to(dev, dtype)) - o_proj(torch.zeros_like(dirs[:1]).to(dev, dtype))).float().cpu()
    return direction_token_effects(lm, dirs, n)


def direction_token_effects(lm, dirs, n: int = 10):
    """Per residual-stream direction (rows of dirs [n_dirs, d_model]) the n most promoted and n most suppressed
    output tokens through the final norm's weight and the unembedding: [(promoted, suppressed)]."""
    import torch
    from torch import nn

    a = lm.adapter
    w_u = a.unembed.weight.detach().float().cpu()  # [vocab, d_model]
    dirs = torch.as_tensor(dirs).detach().float().cpu()
    with torch.inference_mode():
        norm = a.final_norm
        if isinstance(norm, nn.LayerNorm):
            dirs = dirs - dirs.mean(-1, keepdim=True)
        weight = getattr(norm, "weight", None)
        if weight is not None:
            w = weight.detach().float().cpu()
            dirs = dirs * ((1.0 + w) if "gemma" in type(norm).__name__.lower() else w)
        effects = dirs @ w_u.T  # [n_feat, vocab]
        k = min(n, effects.shape[-1])
        top = effects.topk(k, dim=-1)
        bottom = (-effects).topk(k, dim=-1)
    out = []
    for i in range(dirs.shape[0]):
        up_ids, down_ids = top.indices[i].tolist(), bottom.indices[i].tolist()
        up = lm.tokens_of_ids(up_ids).display
        down = lm.tokens_of_ids(down_ids).display
        out.append((list(zip(up, top.values[i].tolist())), list(zip(down, (-bottom.values[i]).tolist()))))
    return out


# ---- the corpus pass -------------------------------------------------------------------------------------

def build_dashboards_job(lm, sae, corpus_path, features=None, n_top: int = 10, context: int = 8,
                         cancel: CancelToken | None = None, batch_size: int = 16, seq_len: int = 128,
                         max_tokens: int = 200_000, n_logit: int = 10, hook: str | None = None,
                         force_hook: bool = False, cache_dir=None):
    """Job returning [FeatureDashboard] for `features` (None = all). On cancel, the dashboards of the part
    scanned so far are returned. The activations come from the activation cache (computed once per model,
    hook, corpus and seq_len); cache_dir=False runs the model batch by batch instead."""
    import torch

    from desktop_app.engine.capture import run_with_cache
    from desktop_app.engine.sae import corpus as corpus_mod
    from desktop_app.engine.sae.jobs import _as_sae, trusted_sae

    cancel = cancel or CancelToken()
    sae = _as_sae(sae, hook)
    sae, hook = trusted_sae(lm, sae, hook, force_hook)
    features = list(range(sae.d_sae)) if features is None else [int(f) for f in features]
    bad = [f for f in features if not 0 <= f < sae.d_sae]
    if bad:
        from desktop_app.engine.errors import SAEError
        raise SAEError(f"Feature {bad[0]} does not exist; this SAE has features 0-{sae.d_sae - 1}.")
    docs = corpus_mod.tokenize_documents(lm, corpus_mod.read_corpus(corpus_path), seq_len, max_tokens)
    feat_idx = torch.tensor(features, dtype=torch.long)
    sae.to("cpu")
    act_cache = None
    if cache_dir is not False and docs:
        from desktop_app.engine.sae.activation_cache import collect_activations_cached
        act_cache = yield from collect_activations_cached(lm, hook, docs, seq_len, cache_dir=cache_dir,
                                                          batch_size=batch_size, cancel=cancel)

    def encode(doc_ids, ids):
        if act_cache is not None:
            x = act_cache.doc_batch(doc_ids[0], doc_ids[-1] + 1)
        else:
            _, cache = run_with_cache(lm, ids, [hook], cancel=cancel)
            x = cache[hook].float()
            x = x.reshape(*x.shape[:2], -1)
        with torch.inference_mode():
            return sae.encode(x)[..., feat_idx].float()

    scan = yield from scan_corpus(docs, encode, len(features), n_top, context, batch_size, cancel)
    yield Progress(scan.n_batches, scan.n_batches, "output tokens")
    return assemble_dashboards(lm, docs, features, scan, output_token_effects(lm, sae, features, n_logit), context)


@dataclass
class CorpusScan:
    """What one pass over a corpus kept per feature: its n_top best (document, position) with the activations
    of the window around each, how often it fired, its maximum and its histogram."""
    top_val: object  # [n_f, n_top]; -1 where nothing was kept
    top_doc: object
    top_pos: object
    top_win: object  # [n_f, n_top, 2 * context + 1]
    fired: object  # [n_f]
    max_act: object
    hist: np.ndarray  # [n_f, bins]
    n_tokens: int
    n_batches: int


def scan_corpus(docs: list[list[int]], encode, n_f: int, n_top: int, context: int, batch_size: int,
                cancel: CancelToken):
    """Job: one pass over `docs` in right-padded batches; encode(doc_ids, ids [B, L]) gives the features'
    activations [B, L, n_f] (positions past a document's length are ignored). Cancelling returns what the
    batches scanned so far give. The running top-n per feature is a vectorised heap: each batch's best
    (document, position) per feature is merged with the kept ones by one top-k over their concatenation."""
    import torch

    from desktop_app.engine.errors import JobCancelled
    from desktop_app.engine.sae import corpus as corpus_mod

    width = 2 * context + 1
    top_val = torch.full((n_f, n_top), -1.0)
    top_doc = torch.full((n_f, n_top), -1, dtype=torch.long)
    top_pos = torch.zeros((n_f, n_top), dtype=torch.long)
    top_win = torch.zeros((n_f, n_top, width))
    fired = torch.zeros(n_f)
    max_act = torch.zeros(n_f)
    n_bins = len(HIST_EDGES) - 1
    hist = np.zeros((n_f, n_bins), dtype=np.int64)
    n_tokens = 0
    n_batches = (len(docs) + batch_size - 1) // batch_size
    offsets = torch.arange(-context, context + 1)
    try:
        for b, (doc_ids, ids, lengths) in enumerate(corpus_mod.padded_batches(docs, batch_size)):
            cancel.check()
            yield Progress(b, n_batches, f"dashboards: batch {b + 1} of {n_batches}")
            f = encode(doc_ids, ids)
            valid = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
            f = torch.where(valid[..., None], f, torch.full_like(f, -1.0))
            n_tokens += int(valid.sum())
            active = f > 0
            fired += active.sum((0, 1)).float()
            max_act = torch.maximum(max_act, f.amax((0, 1)).clamp_min(0))
            rows, cols, fs = active.nonzero(as_tuple=True)
            if fs.numel():
                bins = np.clip(np.searchsorted(HIST_EDGES, f[rows, cols, fs].numpy(), side="right") - 1, 0, n_bins - 1)
                hist += np.bincount(fs.numpy() * n_bins + bins, minlength=n_f * n_bins).reshape(n_f, n_bins)
            # best position per (document, feature), then each feature's best documents of this batch
            seq_max, seq_arg = f.max(dim=1)  # [B, n_f]
            k = min(n_top, seq_max.shape[0])
            cand_val, cand_row = seq_max.T.topk(k, dim=1)  # [n_f, k]
            cand_pos = seq_arg.T.gather(1, cand_row)
            win_pos = (cand_pos[..., None] + offsets).clamp(0, ids.shape[1] - 1)  # [n_f, k, width]
            fi = torch.arange(n_f)[:, None, None].expand_as(win_pos)
            cand_win = f[cand_row[..., None].expand_as(win_pos), win_pos, fi].clamp_min(0)
            doc_tensor = torch.tensor(doc_ids)[cand_row]
            merged_val = torch.cat([top_val, cand_val], 1)
            keep_val, keep = merged_val.topk(n_top, dim=1)
            top_val = keep_val
            top_doc = torch.cat([top_doc, doc_tensor], 1).gather(1, keep)
            top_pos = torch.cat([top_pos, cand_pos], 1).gather(1, keep)
            top_win = torch.cat([top_win, cand_win], 1).gather(1, keep[..., None].expand(-1, -1, width))
    except JobCancelled:
        pass
    return CorpusScan(top_val, top_doc, top_pos, top_win, fired, max_act, hist, n_tokens, n_batches)


def assemble_dashboards(lm, docs, features: list[int], scan: CorpusScan, effects, context: int,
                        layers: list[int] | None = None, output_notes: list[str] | None = None
                        ) -> list[FeatureDashboard]:
    """The dashboards of a finished scan; effects: per feature (promoted, suppressed) output tokens."""
    out = []
    n_top = scan.top_val.shape[1]
    for i, feat in enumerate(features):
        contexts = []
        for j in range(n_top):
            val, doc = float(scan.top_val[i, j]), int(scan.top_doc[i, j])
            if doc < 0 or val <= 0:
                continue
            pos = int(scan.top_pos[i, j])
            lo, hi = max(0, pos - context), min(len(docs[doc]), pos + context + 1)
            shown = lm.tokens_of_ids(docs[doc][lo:hi]).display
            acts = scan.top_win[i, j, lo - pos + context: hi - pos + context].tolist()
            contexts.append(TopContext(tokens=shown, max_index=pos - lo, activation=val, activations=acts,
                                       document=doc, position=pos))
        out.append(FeatureDashboard(
            feature=feat, layer=None if layers is None else int(layers[i]), max_activation=float(scan.max_act[i]),
            density=float(scan.fired[i]) / max(scan.n_tokens, 1), n_tokens=scan.n_tokens, top_contexts=contexts,
            histogram_counts=scan.hist[i].tolist(), histogram_edges=HIST_EDGES.tolist(),
            promoted=effects[i][0], suppressed=effects[i][1], output_note=output_notes[i] if output_notes else ""))
    return out


def dashboards_to_list(dashboards: list[FeatureDashboard]) -> list[dict]:
    """JSON-able form for the project file."""
    return [d.to_dict() for d in dashboards]


def dashboards_from_list(items: list[dict]) -> list[FeatureDashboard]:
    return [FeatureDashboard.from_dict(d) for d in items]

