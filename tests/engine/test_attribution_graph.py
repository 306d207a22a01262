"""Attribution graphs: transcoders trained in the test, the replacement model, edges against finite perturbations
of the frozen model, logit completeness, pruning."""
import numpy as np
import pytest
import torch
from graph_checks import assert_inputs_are_edges_plus_bias

from desktop_app import demo_task
from desktop_app.engine.attribution_graph import (EMBEDDING, ERROR, FEATURE, LOGIT, ReplacementContext,
                                                  _detached_run, build_graph, prune, scores, smallest_covering)
from desktop_app.engine.errors import SAEError, SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.replay import record_run, run_from_layer
from desktop_app.engine.transcoders import (fit_transcoders, load_transcoder_set, parse_flat_yaml,
                                            save_transcoder_set)

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _batches(lm, n=24, pos=16):
    texts = demo_task.corpus(n, seed=1)
    ids = [lm.tokenize(t, True).ids[:pos] for t in texts]
    ids = [i for i in ids if len(i) == pos]
    return [torch.tensor(ids[j:j + 8]) for j in range(0, len(ids), 8)]


@pytest.fixture(scope="module", params=["gpt2", "llama", "neox"])
def trained(request, tmp_path_factory):
    lm = request.getfixturevalue(f"lm_{request.param}")
    tset = drive(fit_transcoders(lm, _batches(lm), d_transcoder=64, k=4, steps=150, skip=request.param == "llama"))
    folder = save_transcoder_set(tset, tmp_path_factory.mktemp("tc") / request.param, model_name=request.param)
    return lm, load_transcoder_set(folder, n_layers=lm.info.n_layers, d_model=lm.info.d_model), folder


@pytest.fixture(scope="module")
def graph_of(trained):
    lm, tset, _ = trained
    ids = torch.tensor([lm.tokenize(PROMPT, True).ids])
    return ids, drive(build_graph(lm, ids, tset, max_feature_nodes=60, max_n_logits=4, desired_logit_prob=0.9))


def test_saved_set_round_trips(trained):
    lm, tset, folder = trained
    again = load_transcoder_set(folder)
    x = torch.randn(5, lm.info.d_model)
    for a, b in zip(tset.layers, again.layers):
        assert torch.equal(a(x), b(x))
    assert tset.layers[0].activation == "topk" and tset.layers[0].k == 4


def test_replacement_model_reproduces_real_logits(trained, graph_of):
    lm, tset, _ = trained
    ids, graph = graph_of
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits[0, -1].float().numpy()
    np.testing.assert_allclose(graph.real_logits[-1], plain, atol=1e-5)
    np.testing.assert_allclose(graph.replacement_logits, plain, atol=1e-5)
    # and the transcoders really replace the MLPs: without the error terms the logits move
    run = _detached_run(record_run(lm, ids))
    with ReplacementContext(lm, tset) as ctx, torch.no_grad():
        run_from_layer(lm, run, 0, run.resid_pre[0])
        ctx.errors = [torch.zeros(1) for _ in tset.layers]
        ctx.set_mode("replacement")
        no_error = run_from_layer(lm, run, 0, run.resid_pre[0])[0].numpy()
    assert np.abs(no_error - plain).max() > 1e-3


def test_logit_inputs_are_their_direct_effects_plus_bias(graph_of):
    _ids, graph = graph_of
    assert_inputs_are_edges_plus_bias(graph)


def _frozen_inputs(lm, tset, ids, graph, drop):
    """Every target's input in the frozen replacement model (no autograd) with source `drop` removed, computed
    from scratch: its own record, its own injections."""
    run = _detached_run(record_run(lm, ids))
    kinds = np.array(graph.node_kind)
    n_layers = len(tset.layers)
    with ReplacementContext(lm, tset) as ctx, torch.no_grad():
        run_from_layer(lm, run, 0, run.resid_pre[0])
        emb = run.resid_pre[0].clone()
        inject = [ctx.mlp_out0[L] - tset.layers[L].skip(ctx.mlp_in0[L]) for L in range(n_layers)]
        L, p, f = (0, 0, 0) if drop is None else (int(graph.node_layer[drop]), int(graph.node_pos[drop]),
                                                   int(graph.node_feature[drop]))
        if drop is None:
            pass
        elif kinds[drop] == EMBEDDING:
            emb[0, p] = 0
        elif kinds[drop] == FEATURE:
            inject[L][0, p] -= graph.activation[drop] * tset.layers[L].W_dec[f]
        else:  # an error node: the MLP output minus the reconstruction of the features in the graph
            in_graph = (kinds == FEATURE) & (graph.node_layer == L) & (graph.node_pos == p)
            recon = tset.layers[L].b_dec + tset.layers[L].skip(ctx.mlp_in0[L][0, p]) + sum(
                (graph.activation[i] * tset.layers[L].W_dec[graph.node_feature[i]] for i in np.where(in_graph)[0]),
                torch.zeros(lm.info.d_model))
            inject[L][0, p] -= ctx.mlp_out0[L][0, p] - recon
        ctx.set_mode("frozen")
        ctx.mlp_inject = inject
        logits = run_from_layer(lm, run, 0, emb)[0].double()
        out = np.zeros(graph.n)
        for t in np.where(np.isin(kinds, [LOGIT, FEATURE]))[0]:
            if kinds[t] == LOGIT:
                out[t] = logits[graph.node_feature[t]]
            else:
                tc = tset.layers[graph.node_layer[t]]
                x = ctx.mlp_in[graph.node_layer[t]][0, graph.node_pos[t]]
                out[t] = float(tc.preactivations(x)[graph.node_feature[t]])
    return out


def test_edges_equal_finite_perturbations(trained, graph_of):
    lm, tset, _ = trained
    ids, graph = graph_of
    kinds = np.array(graph.node_kind)
    rng = np.random.default_rng(0)
    sources = []
    for kind in (FEATURE, ERROR, EMBEDDING):
        idx = np.where(kinds == kind)[0]
        strongest = idx[np.argsort(-np.abs(graph.adjacency[:, idx]).max(0))[:2]]
        sources += list(strongest) + list(rng.choice(idx, size=min(2, len(idx)), replace=False))
    targets = np.where(np.isin(kinds, [LOGIT, FEATURE]))[0]
    base = _frozen_inputs(lm, tset, ids, graph, drop=None)
    np.testing.assert_allclose(base[targets], graph.target_input[targets], atol=1e-4)
    for s in sources:
        without = _frozen_inputs(lm, tset, ids, graph, drop=s)
        change = base[targets] - without[targets]
        np.testing.assert_allclose(graph.adjacency[targets, s], change, atol=3e-5, rtol=1e-4)
    assert np.abs(graph.adjacency).max() > 0


def test_pruning_keeps_the_requested_influence(graph_of):
    _, graph = graph_of
    kinds = np.array(graph.node_kind)
    for threshold in (0.5, 0.8, 0.95):
        node_mask, edge_mask, infl = prune(graph, threshold, 0.9)
        f = kinds == FEATURE
        kept = infl[f & node_mask].sum()
        assert kept >= threshold * infl[f].sum() * (1 - 1e-9)
        # the fewest: dropping the weakest kept feature falls below the threshold
        weakest = infl[f & node_mask].min()
        assert kept - weakest < threshold * infl[f].sum()
        assert node_mask[~f].all()
        assert not edge_mask[~node_mask].any() and not edge_mask[:, ~node_mask].any()
    replacement, completeness = scores(graph)
    assert 0 <= replacement <= 1 and 0 <= completeness <= 1


def test_smallest_covering_by_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        s = rng.random(7)
        frac = rng.random()
        mask = smallest_covering(s, frac)
        best = min(bin(m).count("1") for m in range(1 << 7)
                   if sum(s[i] for i in range(7) if m >> i & 1) >= frac * s.sum() * (1 - 1e-12))
        assert mask.sum() == best and s[mask].sum() >= frac * s.sum() * (1 - 1e-12)


def test_refusals(trained, tmp_path, lm_gpt2, lm_llama):
    lm, tset, folder = trained
    other = lm_llama if lm is lm_gpt2 else lm_gpt2
    if other.info.d_model != lm.info.d_model:
        with pytest.raises(SAEError, match="d_model"):
            load_transcoder_set(folder, n_layers=other.info.n_layers, d_model=other.info.d_model)
    with pytest.raises(SAEError, match="layers"):
        load_transcoder_set(folder, n_layers=lm.info.n_layers + 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text("model_kind: transcoder_set\n")
    (broken / "layer_1.safetensors").write_bytes((folder / "layer_1.safetensors").read_bytes())
    with pytest.raises(SAEError, match="misses layer"):
        load_transcoder_set(broken, n_layers=2)
    from desktop_app.engine.errors import OutOfMemory
    with pytest.raises(OutOfMemory, match="nodes and need about"):
        drive(build_graph(lm, torch.tensor([lm.tokenize(PROMPT, True).ids]), tset, memory_budget=10_000))
    with pytest.raises(SpecError, match="does not fit"):
        drive(build_graph(lm, torch.tensor([[1, 2, 3]]), type(tset)(tset.layers[:1], {})))


def test_flat_yaml_parser():
    cfg = parse_flat_yaml("# c\nmodel_name: gpt2\nk: 4\nrate: 0.5\nskip: true\ntranscoders:\n  - a.safetensors\n"
                          "  - 'b.safetensors'\n", "x")
    assert cfg == {"model_name": "gpt2", "k": 4, "rate": 0.5, "skip": True,
                   "transcoders": ["a.safetensors", "b.safetensors"]}
    with pytest.raises(SAEError):
        parse_flat_yaml("a:\n  b: 1\n", "x")
    with pytest.raises(SAEError):
        parse_flat_yaml("!!python/object:os.system x\n", "x")


def test_gpt2_edges_match_a_hand_written_frozen_model(lm_gpt2):
    """An independent reference for GPT-2: LayerNorms with their scale detached, softmax patterns detached, MLP
    outputs held at their values (direct effects); the gradient of each logit node w.r.t. the embeddings times the
    embeddings must be the graph's embedding -> logit edges."""
    lm = lm_gpt2
    tset = drive(fit_transcoders(lm, _batches(lm), d_transcoder=32, k=4, steps=50))
    ids = torch.tensor([lm.tokenize(PROMPT, True).ids])
    graph = drive(build_graph(lm, ids, tset, max_feature_nodes=10, max_n_logits=3, desired_logit_prob=0.9))
    tr = lm.model.transformer
    n_pos, n_head = ids.shape[1], lm.info.n_heads

    def ln(mod, x):
        mu = x.mean(-1, keepdim=True)
        sd = ((x - mu).pow(2).mean(-1, keepdim=True) + mod.eps).sqrt().detach()
        return (x - mu) / sd * mod.weight + mod.bias

    with torch.no_grad():
        emb0 = tr.wte(ids) + tr.wpe(torch.arange(n_pos))[None]
        hooks_out = []
        handles = [b.mlp.register_forward_hook(lambda m, a, o: hooks_out.append(o.detach())) for b in tr.h]
        lm.model(input_ids=ids)
        for hd in handles:
            hd.remove()
        mlp_outs = hooks_out
    emb = emb0.clone().requires_grad_(True)
    h = emb
    for L, block in enumerate(tr.h):
        x = ln(block.ln_1, h)
        q, k, v = block.attn.c_attn(x).split(lm.info.d_model, dim=-1)
        split = lambda t: t.view(1, n_pos, n_head, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        scores_ = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        scores_ = scores_.masked_fill(torch.ones(n_pos, n_pos).triu(1).bool(), float("-inf"))
        pattern = torch.softmax(scores_, -1).detach()
        z = (pattern @ v).transpose(1, 2).reshape(1, n_pos, -1)
        h = h + block.attn.c_proj(z)
        h = h + mlp_outs[L]
    logits = ln(tr.ln_f, h) @ lm.model.lm_head.weight.T
    kinds = np.array(graph.node_kind)
    emb_cols = np.where(kinds == EMBEDDING)[0]
    for t in np.where(kinds == LOGIT)[0]:
        (grad,) = torch.autograd.grad(logits[0, -1, graph.node_feature[t]], emb, retain_graph=True)
        expected = (grad[0] * emb0[0]).sum(-1).numpy()
        np.testing.assert_allclose(graph.adjacency[t, emb_cols], expected, atol=2e-5, rtol=1e-4)
        assert abs(logits[0, -1, graph.node_feature[t]].item() - graph.target_input[t]) < 1e-4


def test_cancel_stops_the_graph(trained):
    from desktop_app.engine.errors import JobCancelled
    from desktop_app.engine.jobs import CancelToken, Progress

    lm, tset, _ = trained
    token = CancelToken()
    seen = []
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())

    def on_event(event):
        if isinstance(event, Progress):
            seen.append(event)
            if len(seen) == 2:
                token.cancel()
    job = build_graph(lm, torch.tensor([lm.tokenize(PROMPT, True).ids]), tset, max_feature_nodes=60, batch_size=4,
                      cancel=token)
    with pytest.raises(JobCancelled):
        drive(job, on_event)
    assert len(seen) == 2
    # the hooks and the attention implementation are restored: the model runs as before
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(out).all()
    assert all(getattr(lm.adapter.attn(L), "config")._attn_implementation == "eager"
               for L in range(lm.info.n_layers))
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules()) == hooks_before
