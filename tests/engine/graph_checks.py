"""Checks that every attribution graph must pass, whatever its transcoders (per-layer or cross-layer)."""
import numpy as np

from desktop_app.engine.attribution_graph import FEATURE, LOGIT


def assert_inputs_are_edges_plus_bias(graph) -> None:
    """Each logit's and feature's input is the sum of its incoming edges plus its bias, and a logit node's input
    is the model's real logit of its token at the last position."""
    kinds = np.array(graph.node_kind)
    for t in np.where(np.isin(kinds, [LOGIT, FEATURE]))[0]:
        total = graph.adjacency[t].astype(np.float64).sum() + graph.bias[t]
        assert abs(total - graph.target_input[t]) < 1e-4 * (1 + abs(graph.target_input[t]))
    for t, tok in zip(np.where(kinds == LOGIT)[0], graph.node_feature[kinds == LOGIT]):
        assert abs(graph.target_input[t] - graph.real_logits[-1][tok]) < 1e-4
