"""Feature dashboards (cards) of per-layer transcoder features, with the SAE dashboards' implementation.

A transcoder feature of layer L reads the MLP's input after its norm and writes W_dec[f] to the MLP's output,
which is added to the residual stream. Its card: density and top activating contexts over a corpus
(engine/sae/dashboards.scan_corpus, with an encoder that runs the model and encodes each needed layer's MLP input),
and the output tokens W_dec[f] promotes / suppresses through the final norm's weight and the unembedding
(dashboards.direction_token_effects, as for an SAE on the residual stream).

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


def mlp_inputs(lm, ids: torch.Tensor, layers: list[int], cancel: CancelToken | None = None) -> dict:
    """The MLP's input after its norm at each of `layers`: {layer: [B, L, d_model] float32 on the CPU}, from one
    forward pass (the transcoders' input, as the attribution graph reads it)."""
    got: dict[int, torch.Tensor] = {}
    handles = []

    def grab(layer):
        def hook(_mod, args, _output):
            if cancel is not None:
                cancel.check()
            got[layer] = args[0].detach().float().cpu()
        return hook

    try:
        for L in layers:
            handles.append(lm.adapter.mlp(L).register_forward_hook(grab(L)))
        with torch.inference_mode():
            lm.model(input_ids=ids.to(lm.input_device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return got


def _check_features(tset, features) -> list[tuple[int, int]]:
    if features is None:
        return [(L, f) for L, tc in enumerate(tset.layers) for f in range(tc.d_transcoder)]
    out = []
    for item in features:
        layer, feat = (int(item[0]), int(item[1])) if not isinstance(item, str) else parse_feature_label(item)
        if not 0 <= layer < len(tset.layers):
            raise SAEError(f"feature {feature_label(layer, feat)} names layer {layer}, but the transcoder set has "
                           f"layers 0-{len(tset.layers) - 1}.")
        if not 0 <= feat < tset.layers[layer].d_transcoder:
            raise SAEError(f"feature {feature_label(layer, feat)} does not exist; layer {layer}'s transcoder has "
                           f"features 0-{tset.layers[layer].d_transcoder - 1}.")
        out.append((layer, feat))
    return out


def transcoder_dashboards_job(lm, transcoders, corpus_path, features=None, n_top: int = 10, context: int = 8,
                              cancel: CancelToken | None = None, batch_size: int = 16, seq_len: int = 128,
                              max_tokens: int = 200_000, n_logit: int = 10) -> list[FeatureDashboard]:
    """Job returning one FeatureDashboard (with its layer) per transcoder feature in `features` ((layer, feature)
    pairs or `layer:feature` labels; None: every feature of every layer), over the corpus streamed in batches.
    `transcoders` is a folder (a circuit-tracer set) or a loaded TranscoderSet. On cancel, the dashboards of the
    part scanned so far are returned."""
    from desktop_app.engine.sae import corpus as corpus_mod
    from desktop_app.engine.transcoders import TranscoderSet, load_transcoder_set, reads_resid_mid

    cancel = cancel or CancelToken()
    loaded = isinstance(transcoders, TranscoderSet) or getattr(transcoders, "cross_layer", False)
    tset = transcoders if loaded else load_transcoder_set(transcoders, n_layers=lm.info.n_layers,
                                                          d_model=lm.info.d_model)
    if getattr(tset, "cross_layer", False):
        raise SAEError("feature cards are not built for cross-layer transcoders yet (a feature writes into several "
                       "layers, so it has no single decoder direction for its promoted tokens); use a per-layer set.")
    if reads_resid_mid(tset):
        raise SAEError("feature cards are not built for transcoders that read hook_resid_mid yet (the corpus scan "
                       "reads the MLP's input after its norm); use a set that reads the MLP's input.")
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
        xs = mlp_inputs(lm, ids, layers, cancel)
        with torch.inference_mode():
            parts = [tset.layers[L].encode(xs[L])[..., columns[L]] for L in layers]
            return torch.cat(parts, -1)[..., restore].float()

    scan = yield from scan_corpus(docs, encode, len(pairs), n_top, context, batch_size, cancel)
    yield Progress(scan.n_batches, scan.n_batches, "output tokens")
    dirs = torch.stack([tset.layers[L].W_dec[f].detach().float().cpu() for L, f in pairs]) if pairs \
        else torch.zeros(0, tset.d_model)
    effects = direction_token_effects(lm, dirs, n_logit)
    return assemble_dashboards(lm, docs, [f for _, f in pairs], scan, effects, context,
                               layers=[L for L, _ in pairs])
