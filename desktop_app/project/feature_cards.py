"""Feature cards of an attribution graph, kept in the graph's result so a saved project re-opens with them.

The cards are the transcoder dashboards (engine/transcoder_dashboards.py) of the graph's feature nodes, stored as
one JSON text in the result's extras under `feature_cards_json`:

    {"transcoders": folder, "corpus": file, "n_tokens": int, "cards": [FeatureDashboard dicts with "layer"]}

Only what a card shows is kept (top contexts, density, maximum, promoted / suppressed tokens; no histograms), for
at most MAX_CARDS features (the most influential), so the size stays bounded by the graph, not the corpus.
Qt-free.
"""
from __future__ import annotations

import json

import numpy as np

from desktop_app.engine.sae.dashboards import FeatureDashboard

CARDS_KEY = "feature_cards_json"
MAX_CARDS = 1000


def graph_features(result, limit: int = MAX_CARDS) -> list[tuple[int, int]]:
    """The graph's distinct (layer, feature) pairs of feature nodes, most influential first, at most `limit`."""
    ex = result.extras
    kinds = np.asarray(ex["node_kind"]).astype(str)
    idx = np.where(kinds == "feature")[0]
    infl = np.asarray(ex["node_influence"], dtype=float)[idx]
    idx = idx[np.argsort(-infl, kind="stable")]
    layers, feats = np.asarray(ex["node_layer"], dtype=int), np.asarray(ex["node_feature"], dtype=int)
    out: list[tuple[int, int]] = []
    for i in idx:
        pair = (int(layers[i]), int(feats[i]))
        if pair not in out:
            out.append(pair)
        if len(out) >= limit:
            break
    return out


def attach_cards(result, dashboards: list[FeatureDashboard], corpus: str, transcoders: str) -> None:
    """Store `dashboards` as the graph result's feature cards (replacing any it had)."""
    cards = []
    for d in dashboards:
        item = d.to_dict()
        item["histogram_counts"], item["histogram_edges"] = [], []
        cards.append(item)
    payload = {"transcoders": str(transcoders), "corpus": str(corpus),
               "n_tokens": int(dashboards[0].n_tokens) if dashboards else 0, "cards": cards}
    result.extras[CARDS_KEY] = np.array(json.dumps(payload, ensure_ascii=False, allow_nan=False))


def cards_info(result) -> dict | None:
    """The stored payload without its cards ({"transcoders", "corpus", "n_tokens"}), or None."""
    payload = _payload(result)
    return None if payload is None else {k: v for k, v in payload.items() if k != "cards"}


def cards_of(result) -> dict[tuple[int, int], FeatureDashboard]:
    """The graph result's cards by (layer, feature); empty when it has none."""
    payload = _payload(result)
    if payload is None:
        return {}
    out = {}
    for item in payload.get("cards", []):
        d = FeatureDashboard.from_dict(item)
        out[(int(d.layer if d.layer is not None else -1), int(d.feature))] = d
    return out


def _payload(result) -> dict | None:
    raw = None if result is None else result.extras.get(CARDS_KEY)
    if raw is None:
        return None
    try:
        payload = json.loads(str(np.asarray(raw).item()))
    except (ValueError, TypeError):
        return None
    return payload if isinstance(payload, dict) else None
