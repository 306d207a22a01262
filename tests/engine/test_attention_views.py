"""Attention patterns against output_attentions; rollout against a numpy product; flow against brute-force
minimum cuts."""
import itertools

import numpy as np
import pytest
import torch

from desktop_app.engine.attention_views import (attention_patterns_job, attention_rollout_job, flow_graph,
                                               max_flow, residual_adjusted)
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import Progress, drive

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _attentions(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0] for a in out.attentions]).float()


def test_patterns_from_one_forward_pass_equal_output_attentions(tiny_lm):
    tokens = tiny_lm.tokenize(PROMPT)
    calls = []
    handle = tiny_lm.adapter.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        res = drive(attention_patterns_job(tiny_lm, tokens))
    finally:
        handle.remove()
    assert len(calls) == 1
    ref = _attentions(tiny_lm, tokens.ids)
    assert res.dims == ["layer", "head", "query", "key"]
    np.testing.assert_allclose(res.values, ref.numpy(), atol=1e-6)
    part = drive(attention_patterns_job(tiny_lm, tokens, layers=[1], heads=[0, 2]))
    np.testing.assert_allclose(part.values, ref[1:2][:, [0, 2]].numpy(), atol=1e-6)
    assert part.labels["head"] == ["0", "2"] and part.labels["key"] == tokens.labels()


def test_bad_layers_are_refused(lm_gpt2):
    with pytest.raises(SpecError, match="out of range"):
        drive(attention_patterns_job(lm_gpt2, lm_gpt2.tokenize(PROMPT), layers=[7]))
    with pytest.raises(SpecError):
        drive(attention_rollout_job(lm_gpt2, lm_gpt2.tokenize(PROMPT), residual=2.0))


@pytest.mark.parametrize("fusion", ["mean", "max"])
def test_rollout_is_the_product_of_adjusted_patterns_and_rows_sum_to_one(tiny_lm, fusion):
    tokens = tiny_lm.tokenize(PROMPT)
    res = drive(attention_rollout_job(tiny_lm, tokens, residual=0.3, head_fusion=fusion))
    att = _attentions(tiny_lm, tokens.ids).double().numpy()
    fused = att.mean(1) if fusion == "mean" else att.max(1)
    acc = np.eye(len(tokens.ids))
    for L in range(att.shape[0]):
        a = 0.7 * fused[L] + 0.3 * np.eye(len(tokens.ids))
        a = a / a.sum(-1, keepdims=True)
        acc = a @ acc
        np.testing.assert_allclose(res.values[L], acc, atol=1e-5)
    np.testing.assert_allclose(res.values.sum(-1), 1.0, atol=1e-5)
    assert np.triu(res.values[-1], 1).max() < 1e-7  # causal: nothing flows from later tokens


def _min_cut(cap, s, t):
    """The smallest capacity of an s-t cut, by enumerating every set of the other nodes on the source side."""
    others = [v for v in range(cap.shape[0]) if v not in (s, t)]
    best = np.inf
    for bits in itertools.product([0, 1], repeat=len(others)):
        side = {s} | {v for v, b in zip(others, bits) if b}
        cut = sum(cap[u, v] for u in side for v in range(cap.shape[0]) if v not in side)
        best = min(best, cut)
    return best


def test_max_flow_equals_brute_force_min_cut():
    rng = np.random.default_rng(0)
    att = rng.random((2, 3, 3)) * np.tril(np.ones((3, 3)))
    adj = residual_adjusted(torch.tensor(att)[:, None], 0.5, "mean").numpy()
    cap = flow_graph(adj, 1)
    for k in range(3):
        for q in range(3):
            assert max_flow(cap, k, 2 * 3 + q) == pytest.approx(_min_cut(cap, k, 2 * 3 + q), abs=1e-9)
    # one layer: the only path is the edge itself
    cap1 = flow_graph(adj, 0)
    for k in range(3):
        for q in range(3):
            assert max_flow(cap1, k, 3 + q) == pytest.approx(adj[0, q, k], abs=1e-12)


def test_flow_job_streams_rows_and_matches_the_graph(lm_llama):
    tokens = lm_llama.tokenize("Mary and John went")
    events = []
    res = drive(attention_rollout_job(lm_llama, tokens, method="flow"), events.append)
    assert res.status == "complete" and np.isfinite(res.values).all()
    assert sum(isinstance(e, Progress) for e in events) > 3
    att = _attentions(lm_llama, tokens.ids)
    adj = residual_adjusted(att, 0.5, "mean").numpy()
    n = len(tokens.ids)
    np.testing.assert_allclose(res.values[0], adj[0], atol=1e-6)
    cap = flow_graph(adj, 1)
    assert res.values[1, n - 1, 0] == pytest.approx(max_flow(cap, 0, 2 * n + n - 1), abs=1e-6)


def test_flow_on_a_long_prompt_is_refused_with_the_graph_size(lm_gpt2):
    tokens = lm_gpt2.tokens_of_ids([5] * 200)
    with pytest.raises(SpecError, match="600 nodes"):
        drive(attention_rollout_job(lm_gpt2, tokens, method="flow"))
