"""The batched edge computation: a graph that keeps only some features has the same edges between its nodes as the
graph of every feature, with each left-out feature's edges added to its error node's; batch sizes do not change
the edges; a cancelled graph leaves the model as it was (MLP forwards included)."""
import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.attribution_graph import ERROR, FEATURE, LOGIT, build_graph
from desktop_app.engine.errors import JobCancelled
from desktop_app.engine.jobs import CancelToken, Progress, drive
from desktop_app.engine.transcoders import fit_transcoders

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def setup(lm_gpt2):
    lm = lm_gpt2
    texts = demo_task.corpus(24, seed=1)
    ids = [i for i in (lm.tokenize(t, True).ids[:16] for t in texts) if len(i) == 16]
    tset = drive(fit_transcoders(lm, [torch.tensor(ids[j:j + 8]) for j in range(0, len(ids), 8)],
                                 d_transcoder=64, k=4, steps=100))
    prompt = torch.tensor([lm.tokenize(PROMPT, True).ids])
    full = drive(build_graph(lm, prompt, tset, max_n_logits=4, desired_logit_prob=0.9, batch_size=16))
    return lm, tset, prompt, full


def _key(graph, i):
    return graph.node_kind[i], int(graph.node_layer[i]), int(graph.node_pos[i]), int(graph.node_feature[i])


def test_a_partial_graph_has_the_full_graphs_edges_with_left_out_features_in_their_error_nodes(setup):
    lm, tset, prompt, full = setup
    n_feat = full.node_kind.count(FEATURE)
    part = drive(build_graph(lm, prompt, tset, max_feature_nodes=n_feat // 3, max_n_logits=4,
                             desired_logit_prob=0.9, batch_size=7))
    assert part.node_kind.count(FEATURE) == n_feat // 3
    index = {_key(full, i): i for i in range(full.n)}
    rows = [index[_key(part, i)] for i in range(part.n)]
    kinds = np.array(part.node_kind)
    fk = np.array(full.node_kind)
    targets = np.isin(kinds, [FEATURE, LOGIT])
    expected = full.adjacency[np.ix_(rows, rows)].astype(np.float64)
    dropped = [i for i in range(full.n) if fk[i] == FEATURE and i not in set(rows)]
    for i in np.where(kinds == ERROR)[0]:
        mine = [j for j in dropped if full.node_layer[j] == part.node_layer[i] and full.node_pos[j] == part.node_pos[i]]
        expected[:, i] += full.adjacency[np.ix_(rows, mine)].astype(np.float64).sum(1)
    np.testing.assert_allclose(part.adjacency[targets], expected[targets], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.bias[targets], full.bias[rows][targets], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(part.target_input[targets], full.target_input[rows][targets], rtol=1e-6, atol=1e-6)
    assert not part.adjacency[~targets].any()


def test_the_batch_size_does_not_change_the_edges(setup):
    lm, tset, prompt, full = setup
    one = drive(build_graph(lm, prompt, tset, max_n_logits=4, desired_logit_prob=0.9, batch_size=1))
    np.testing.assert_allclose(one.adjacency, full.adjacency, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(one.bias, full.bias, rtol=1e-6, atol=1e-6)


def test_a_cancelled_graph_restores_the_mlps(setup):
    lm, tset, prompt, _ = setup
    token = CancelToken()

    def on_event(event):
        if isinstance(event, Progress) and event.done == 1:
            token.cancel()
    with pytest.raises(JobCancelled):
        drive(build_graph(lm, prompt, tset, batch_size=4, cancel=token), on_event)
    assert all("forward" not in lm.adapter.mlp(L).__dict__ for L in range(lm.info.n_layers))
    assert torch.is_grad_enabled()


def test_frozen_mode_without_gradient_only_runs_the_real_mlps(setup):
    """The clamp check's context (a subclass) reads the real MLPs in frozen mode: at the recorded input, the frozen
    model with real MLPs is the real model."""
    from desktop_app.engine.attribution_graph import ReplacementContext, _detached_run
    from desktop_app.engine.replay import record_run, run_from_layer

    lm, tset, prompt, _ = setup
    seen = []

    class RealMLPs(ReplacementContext):
        def _mlp_hook(self, layer):
            recording = super()._mlp_hook(layer)

            def hook(mod, args, output):
                if self.mode == "record":
                    return recording(mod, args, output)
                seen.append(layer)
                return output
            return hook

    run = _detached_run(record_run(lm, prompt))
    with RealMLPs(lm, tset) as ctx, torch.no_grad():
        real = run_from_layer(lm, run, 0, run.resid_pre[0])
        ctx.set_mode("frozen")
        frozen = run_from_layer(lm, run, 0, run.resid_pre[0])
    assert seen == list(range(lm.info.n_layers))
    torch.testing.assert_close(frozen, real, rtol=1e-5, atol=1e-5)


def test_attention_that_ignores_the_frozen_pattern_is_refused(setup, monkeypatch):
    # as with custom attention code that does not dispatch through transformers' attention interface: the config
    # switch to the frozen pattern has no effect, so the pattern would be computed live and every edge be wrong
    from desktop_app.engine.attribution_replacement import ReplacementContext
    from desktop_app.engine.errors import SpecError
    from desktop_app.engine.graph_check import measure_clamps

    lm, tset, prompt, _full = setup
    original = ReplacementContext._attention
    monkeypatch.setattr(ReplacementContext, "_attention",
                        lambda self, what: original(self, "restore") if what == "freeze" else original(self, what))
    with pytest.raises(SpecError, match="attention does not dispatch through transformers' attention interface"):
        drive(build_graph(lm, prompt, tset, max_n_logits=2, batch_size=4))
    with pytest.raises(SpecError, match="attention does not dispatch"):
        measure_clamps(lm, prompt[0].tolist(), tset, [(0, 1, 0, 1.0)], [1])
    monkeypatch.setattr(ReplacementContext, "_attention", original)
    assert lm.model.config._attn_implementation == "eager"  # the model is left as it was
    drive(build_graph(lm, prompt, tset, max_n_logits=2, batch_size=4))


def test_a_frozen_model_that_does_not_reproduce_the_logits_is_refused(setup, monkeypatch):
    # stands in for a model part the frozen model does not account for: what the MLPs write is off (not by a constant,
    # which a centred norm would remove)
    import desktop_app.engine.attribution_edges as edges
    from desktop_app.engine.errors import SpecError

    lm, tset, prompt, _full = setup
    monkeypatch.setattr(edges, "skip_of", lambda tset, layer, x: torch.linspace(0, 1, x.shape[-1]).expand_as(x))
    with pytest.raises(SpecError, match=r"the graph's frozen model does not reproduce the real logits \(off by"):
        drive(build_graph(lm, prompt, tset, max_n_logits=2, batch_size=4))
