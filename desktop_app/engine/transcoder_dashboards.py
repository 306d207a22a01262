"""Feature dashboards (cards) of transcoder features, per-layer or cross-layer, with the SAE dashboards'
implementation.

A per-layer transcoder feature of layer L reads the MLP's input after its norm (or, for sets reading hook_resid_mid,
the residual stream before that norm) and writes W_dec[f] to the MLP's output, which is added to the residual stream.
Its card: density and top activating contexts over a corpus (engine/sae/dashboards.scan_corpus, with an encoder that
runs the model and encodes each needed layer's transcoder input), and the output tokens W_dec[f] promotes /
suppresses through the final norm's weight and the unembedding (dashboards.direction_token_effects, as for an SAE on
the residual stream). A cross-layer transcoder feature read at layer s writes into the MLP outputs of layers
s..n_layers-1; its output tokens are those of its total write into the residual stream, its decoder rows summed over
those layers (the card says so).

    cards = yield from transcoder_dashboards_job(lm, "transcoders/", "corpus.txt", features=[(1, 42), (2, 7)])
"""
from __future__ import annotations

import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.sae.dashboards import (FeatureDashboard, assemble_dashboards, direction_token_effects,
                                               scan_corpus)


def feature_label(layer: int, feature: int) -> str:
    """How a transcoder feature is named in results and cards: `layer:feature`."""
    return f"{int(layer)}:{int(feature)}"


def parse_feature_label(text: str) -> tuple[int, int]:
    layer, _, feature = str(text).partition(":")
    return int(layer), int(feature)


def mlp_inputs(lm, ids: torch.Tensor, layers: list[int], cancel: CancelToken | None = None,
               resid_mid: bool = False) -> dict:
    """What transcoders read at each of `layers`: {layer: [B, L, d_model] float32 on the CPU}, from one forward
    pass: the MLP's input after its norm, or with resid_mid the input of that norm (hook_resid_mid), found as in the
    attribution graph (attribution_replacement.find_mlp_norm)."""
    from desktop_app.engine.attribution_replacement import block_norms, find_mlp_norm

    got: dict[int, torch.Tensor] = {}
    norm_io: dict[int, tuple] = {}
    handles = []

    def grab(layer):
        def hook(_mod, args, _output):
            if cancel is not None:
                cancel.check()
            got[layer] = args[0] if resid_mid else args[0].detach().float().cpu()
        return hook

    def grab_norm(module, args, output):
        norm_io[id(module)] = (args[0], output)

    try:
        for L in layers:
            handles.append(lm.adapter.mlp(L).register_forward_hook(grab(L)))
        if resid_mid:
            wanted = {id(m) for L in layers for m in lm.adapter.blocks[L].modules()}
            handles += [m.register_forward_hook(grab_norm) for m in block_norms(lm) if id(m) in wanted]
        with torch.inference_mode():
            lm.model(input_ids=ids.to(lm.input_device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if resid_mid:
        outputs = {i: y for i, (_x, y) in norm_io.items()}
        got = {L: norm_io[find_mlp_norm(lm, L, outputs, got[L])][0].detach().float().cpu() for L in layers}
    return got


def _check_features(tset, features) -> list[tuple[int, int]]:
    from desktop_app.engine.attribution_replacement import width_of

    n = len(tset)
    if features is None:
        return [(L, f) for L in range(n) for f in range(width_of(tset, L))]
    out = []
    for item in features:
        layer, feat = (int(item[0]), int(item[1])) if not isinstance(item, str) else parse_feature_label(item)
        if not 0 <= layer < n:
            raise SAEError(f"feature {feature_label(layer, feat)} names layer {layer}, but the transcoder set has "
                           f"layers 0-{n - 1}.")
        if not 0 <= feat < width_of(tset, layer):
            raise SAEError(f"feature {feature_label(layer, feat)} does not exist; layer {layer}'s transcoder has "
                           f"features 0-{width_of(tset, layer) - 1}.")
        out.append((layer, feat))
    return out


def output_directions(tset, pairs) -> tuple[torch.Tensor, list[str]]:
    """Per feature the residual-stream direction whose output tokens its card shows [len(pairs), d_model], and a
    note per feature saying what it is when it is not the one decoder row: a cross-layer feature's decoder rows
    summed over the layers it writes into."""
    if not pairs:
        return torch.zeros(0, tset.d_model), []
    if not getattr(tset, "cross_layer", False):
        return torch.stack([tset.layers[L].W_dec[f].detach().float().cpu() for L, f in pairs]), [""] * len(pairs)
    last = len(tset) - 1
    dirs = torch.stack([tset.W_dec[L][f].detach().double().cpu().sum(0).float() for L, f in pairs])
    notes = [f"decoder rows summed over layers {L}..{last} (its total write into the residual stream)" if L < last
             else f"decoder row into layer {L}, the last (the only layer it writes into)" for L, _ in pairs]
    return dirs, notes


def transcoder_dashboards_job(lm, transcoders, corpus_path, features=None, n_top: int = 10, context: int = 8,
                              cancel: CancelToken | None = None, batch_size: int = 16, seq_len: int = 128,
                              max_tokens: int = 200_000, n_logit: int = 10) -> list[FeatureDashboard]:
    """Job returning one FeatureDashboard (with its layer) per transcoder feature in `features` ((layer, feature)
    pairs or `layer:feature` labels; None: every feature of every layer), over the corpus streamed in batches.
    `transcoders` is a folder (any format load_transcoder_set reads, cross-layer included) or a loaded TranscoderSet
    / CrossLayerTranscoder. On cancel, the dashboards of the part scanned so far are returned."""
    from desktop_app.engine.attribution_replacement import check_resid_mid
    from desktop_app.engine.sae import corpus as corpus_mod
    from desktop_app.engine.transcoders import TranscoderSet, load_transcoder_set, reads_resid_mid

    cancel = cancel or CancelToken()
    loaded = isinstance(transcoders, TranscoderSet) or getattr(transcoders, "cross_layer", False)
    tset = transcoders if loaded else load_transcoder_set(transcoders, n_layers=lm.info.n_layers,
                                                          d_model=lm.info.d_model)
    cross = bool(getattr(tset, "cross_layer", False))
    resid_mid = reads_resid_mid(tset)
    if resid_mid:
        check_resid_mid(lm)
    pairs = _check_features(tset, features)
    yield Progress(0, 1, "reading the corpus")
    docs = corpus_mod.tokenize_documents(lm, corpus_mod.read_corpus(corpus_path), seq_len, max_tokens)
    layers = sorted({L for L, _ in pairs})
    # the columns of each layer's encoding that the features take, in the order of `pairs`
    columns = {L: torch.tensor([f for l2, f in pairs if l2 == L], dtype=torch.long) for L in layers}
    by_layer_order = [i for L in layers for i, (l2, _) in enumerate(pairs) if l2 == L]
    restore = torch.empty(len(pairs), dtype=torch.long)
    restore[torch.tensor(by_layer_order, dtype=torch.long)] = torch.arange(len(pairs))

    def encode(_doc_ids, ids):
        xs = mlp_inputs(lm, ids, layers, cancel, resid_mid=resid_mid)
        with torch.inference_mode():
            parts = [(tset.encode(L, xs[L]) if cross else tset.layers[L].encode(xs[L]))[..., columns[L]]
                     for L in layers]
            return torch.cat(parts, -1)[..., restore].float()

    scan = yield from scan_corpus(docs, encode, len(pairs), n_top, context, batch_size, cancel)
    yield Progress(scan.n_batches, scan.n_batches, "output tokens")
    dirs, notes = output_directions(tset, pairs)
    effects = direction_token_effects(lm, dirs, n_logit)
    return assemble_dashboards(lm, docs, [f for _, f in pairs], scan, effects, context,
                               layers=[L for L, _ in pairs], output_notes=notes)
