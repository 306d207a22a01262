"""The most influential nodes of an attribution graph, ranked and named for people: what the result pane draws
(ui.graph_ranking) and what an exported figure of a graph result shows (the kind's figure_slice hook). Qt-free.

The logit nodes are the targets the influence is measured on, so they are left out of the ranking."""
from __future__ import annotations

import numpy as np

from desktop_app.engine.errors import SpecError

TOP_N = 25
AXIS_NAME = "influence on the logits"


def ranked_nodes(extras: dict, n: int = TOP_N) -> np.ndarray:
    """Indices of the `n` non-logit nodes of largest |influence|, largest first (ties: lower index first)."""
    kinds = np.asarray(extras["node_kind"]).astype(str)
    influence = np.asarray(extras["node_influence"], dtype=np.float64)
    idx = np.where(kinds != "logit")[0]
    order = np.argsort(-np.abs(np.nan_to_num(influence[idx])), kind="stable")
    return idx[order[:n]]


def _token(extras: dict, pos: int) -> str:
    tokens = extras.get("prompt_tokens")
    return str(tokens[pos]) if tokens is not None and 0 <= pos < len(tokens) else "?"


def node_label(extras: dict, i: int) -> str:
    """A short readable name of node i: what it is, its layer (and feature), its position and the token there."""
    kind = str(np.asarray(extras["node_kind"])[i])
    layer, pos = int(extras["node_layer"][i]), int(extras["node_pos"][i])
    where = f"@ {pos} {_token(extras, pos)}"
    if kind == "feature":
        return f"L{layer} #{int(extras['node_feature'][i])} {where}"
    if kind == "error":
        return f"error L{layer} {where}"
    if kind == "embedding":
        return f"emb {where}"
    if kind == "logit":
        texts = extras.get("node_token_text")
        return f"logit {texts[i] if texts is not None else '#' + str(int(extras['node_feature'][i]))}"
    return f"{kind} {where}"


def ranked_figure(result, selection: dict | None):
    """figure_slice hook of attribution_graph: the top TOP_N nodes' influence, labelled, largest first (None for a
    result without its node arrays: the figure then draws the values as they are)."""
    from desktop_app.project.kinds import FigureSlice

    if selection:
        raise SpecError(f"an attribution graph figure has no {', '.join(selection)} to choose; it shows the "
                        f"{TOP_N} most influential nodes.")
    ex = result.extras
    if "node_influence" not in ex or "node_kind" not in ex:
        return None
    nodes = ranked_nodes(ex)
    values = np.asarray(ex["node_influence"], dtype=np.float64)[nodes]
    n_ranked = int((np.asarray(ex["node_kind"]).astype(str) != "logit").sum())
    return FigureSlice(values, ["node"], [[node_label(ex, int(i)) for i in nodes]],
                       notes=[f"the {len(nodes)} of {n_ranked} nodes of largest |influence|, logits left out"])
