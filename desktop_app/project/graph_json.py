"""Attribution graphs as Neuronpedia / circuit-tracer graph JSON (numpy only, no torch, no Qt).

The file: {"metadata": {slug, scan, transcoder_list, prompt_tokens, prompt, node_threshold, schema_version},
"qParams": {pinnedIds, supernodes, linkType, clickedId, sg_pos}, "nodes": [{node_id, feature, layer, ctx_idx,
feature_type, influence, activation, ...}], "links": [{source, target, weight}]}. Feature ids are the Cantor
pairing of (layer, feature) as circuit-tracer writes them; error nodes have feature -1, embeddings layer "E",
logits layer n_layers + 1.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np

from desktop_app.engine.errors import ProjectFileError
from desktop_app.engine.results import AnalysisResult

FEATURE_TYPES = {"feature": "cross layer transcoder", "error": "mlp reconstruction error", "embedding": "embedding",
                 "logit": "logit"}
_KIND_OF_TYPE = {v: k for k, v in FEATURE_TYPES.items()}
_KIND_OF_TYPE["transcoder"] = "feature"  # older writers
MAX_BYTES = 512 * 1024 * 1024


def cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def uncantor(z: int) -> tuple[int, int]:
    w = (math.isqrt(8 * z + 1) - 1) // 2
    y = z - w * (w + 1) // 2
    return w - y, y


def _num(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None


def graph_document(result: AnalysisResult, pinned: list[str] | None = None,
                   supernodes: list[list[str]] | None = None) -> dict:
    ex = result.extras
    ids = [str(i) for i in ex["node_ids"]]
    n_layers = int(ex["model_n_layers"])
    nodes = []
    first_logit = next((i for i, k in enumerate(ex["node_kind"]) if str(k) == "logit"), -1)
    for i, node_id in enumerate(ids):
        kind = str(ex["node_kind"][i])
        layer, pos, feat = int(ex["node_layer"][i]), int(ex["node_pos"][i]), int(ex["node_feature"][i])
        node = {"node_id": node_id, "jsNodeId": node_id, "ctx_idx": pos, "feature_type": FEATURE_TYPES[kind],
                "influence": _num(ex["node_influence"][i]), "activation": _num(ex["node_activation"][i])}
        if kind == "feature":
            node.update(feature=cantor(layer, feat), layer=str(layer))
        elif kind == "error":
            node.update(feature=-1, layer=str(layer))
        elif kind == "embedding":
            node.update(feature=pos, layer="E")
        else:
            node.update(feature=feat, layer=str(n_layers + 1), token_prob=_num(ex["node_activation"][i]),
                        is_target_logit=i == first_logit)
            if "node_token_text" in ex:  # Neuronpedia's label of a logit node
                node["clerp"] = f'Output "{ex["node_token_text"][i]}" (p={float(ex["node_activation"][i]):.3f})'
        nodes.append(node)
    adj = np.asarray(ex["adjacency"])
    targets, sources = np.nonzero(adj)
    links = [{"source": ids[s], "target": ids[t], "weight": float(adj[t, s])} for t, s in zip(targets, sources)]
    params = result.params or {}
    pinned = pinned if pinned is not None else params.get("pinned_ids")
    supernodes = supernodes if supernodes is not None else params.get("supernodes")
    tokens = [str(t) for t in ex.get("prompt_tokens", [])]
    metadata = {"slug": result.name, "scan": str(params.get("scan", "")),
                "transcoder_list": [str(params.get("transcoders", ""))], "prompt_tokens": tokens,
                "prompt": "".join(tokens), "node_threshold": params.get("node_threshold"), "schema_version": 1,
                "n_layers": n_layers, "vocab_size": int(ex["model_vocab_size"]),
                "replacement_score": _num(ex["replacement_score"]),
                "completeness_score": _num(ex["completeness_score"])}
    q = {"pinnedIds": list(pinned or []), "supernodes": [list(s) for s in (supernodes or [])], "linkType": "both",
         "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": q, "nodes": nodes, "links": links}


def write_graph_json(result: AnalysisResult, path) -> Path:
    from desktop_app.project.atomic import atomic_write

    doc = graph_document(result)
    data = json.dumps(doc, ensure_ascii=False, allow_nan=False).encode("utf-8")
    atomic_write(path, lambda fh: fh.write(data))
    return Path(path)


def _fail(path, what: str):
    raise ProjectFileError(f"{Path(path).name} is not an attribution graph this app can open: {what}.")


def read_graph_json(path, n_layers: int, vocab_size: int) -> AnalysisResult:
    """A graph JSON (ours, circuit-tracer's or Neuronpedia's) as an attribution_graph result, refused in one
    sentence when its layers or token ids do not fit a model of n_layers / vocab_size."""
    path = Path(path)
    if not path.is_file():
        raise ProjectFileError(f"{path} is not a file.")
    if path.stat().st_size > MAX_BYTES:
        _fail(path, f"it is larger than {MAX_BYTES >> 20} MB")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(path, f"it is not JSON ({err})")
    if not isinstance(doc, dict) or not isinstance(doc.get("nodes"), list) or not isinstance(doc.get("links"), list):
        _fail(path, "it has no nodes and links lists")
    kinds, layers, poss, feats, acts, infl, ids, texts = [], [], [], [], [], [], [], []
    for node in doc["nodes"]:
        if not isinstance(node, dict):
            _fail(path, "a node is not an object")
        try:
            kind = _KIND_OF_TYPE[node["feature_type"]]
            node_id, pos, feature = str(node["node_id"]), int(node["ctx_idx"]), int(node["feature"])
            layer_text = str(node["layer"])
        except (KeyError, TypeError, ValueError) as err:
            _fail(path, f"a node lacks or mistypes {err}")
        if kind == "feature":
            layer, feature = uncantor(feature) if feature >= 0 else (-1, -1)
            if str(layer) != layer_text:
                layer = int(layer_text) if layer_text.lstrip("-").isdigit() else -1
                feature = int(node_id.split("_")[1]) if node_id.count("_") == 2 else feature
        elif kind == "embedding":
            layer, feature = -1, int(node_id.split("_")[1]) if node_id.count("_") == 2 else -1
        else:
            layer = int(layer_text) if layer_text.lstrip("-").isdigit() else -1
            if kind == "logit":
                layer -= 1  # this app keeps logits one past the last layer index (n_layers)
        bad_layer = (kind in ("feature", "error") and not 0 <= layer < n_layers) or \
            (kind == "logit" and layer != n_layers)
        if bad_layer:
            raise ProjectFileError(f"{path.name} is a graph of a model with other layers (node {node_id} sits at "
                                   f"layer {layer_text}, this model has {n_layers}); load its model first.")
        if kind in ("embedding", "logit") and not 0 <= feature < vocab_size:
            raise ProjectFileError(f"{path.name} names token id {feature} (node {node_id}), outside this model's "
                                   f"vocabulary of {vocab_size}; it is a graph of another model.")
        kinds.append(kind)
        layers.append(layer)
        poss.append(pos)
        feats.append(feature)
        a = node.get("token_prob") if kind == "logit" else node.get("activation")
        acts.append(float(a) if isinstance(a, (int, float)) else 0.0)
        i = node.get("influence")
        infl.append(float(i) if isinstance(i, (int, float)) else float("nan"))
        ids.append(node_id)
        clerp = re.match(r'Output "(.*)"', str(node.get("clerp", ""))) if kind == "logit" else None
        texts.append(clerp.group(1) if clerp else "")
    index = {n: i for i, n in enumerate(ids)}
    if len(index) != len(ids):
        _fail(path, "two nodes share a node_id")
    adj = np.zeros((len(ids), len(ids)), dtype=np.float32)
    for link in doc["links"]:
        try:
            adj[index[str(link["target"])], index[str(link["source"])]] = float(link["weight"])
        except (KeyError, TypeError, ValueError) as err:
            _fail(path, f"a link names no known node or weight ({err})")
    meta = doc.get("metadata") if isinstance(doc.get("metadata"), dict) else {}
    tokens = [str(t) for t in meta.get("prompt_tokens", [])] if isinstance(meta.get("prompt_tokens"), list) else []
    extras = {"adjacency": adj, "node_ids": np.array(ids), "node_kind": np.array(kinds),
              "node_layer": np.array(layers, dtype=np.int64), "node_pos": np.array(poss, dtype=np.int64),
              "node_feature": np.array(feats, dtype=np.int64), "node_activation": np.array(acts),
              "node_influence": np.array(infl), "prompt_tokens": np.array(tokens),
              "node_token_text": np.array(texts, dtype=str),
              "replacement_score": np.asarray(float(meta.get("replacement_score") or float("nan"))),
              "completeness_score": np.asarray(float(meta.get("completeness_score") or float("nan"))),
              "model_n_layers": np.asarray(n_layers), "model_vocab_size": np.asarray(vocab_size)}
    q = doc.get("qParams") if isinstance(doc.get("qParams"), dict) else {}
    params = {"scan": str(meta.get("scan", "")), "node_threshold": meta.get("node_threshold"),
              "transcoders": ",".join(str(t) for t in meta.get("transcoder_list", []) or []),
              "pinned_ids": [str(p) for p in q.get("pinnedIds", []) or []],
              "supernodes": [[str(x) for x in s] for s in q.get("supernodes", []) or [] if isinstance(s, list)]}
    return AnalysisResult(name=str(meta.get("slug") or path.stem), kind="attribution_graph", params=params,
                          dims=["node"], values=np.array(infl, dtype=np.float32), labels={"node": ids},
                          extras=extras)
