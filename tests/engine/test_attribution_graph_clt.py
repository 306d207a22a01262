"""Attribution graphs through cross-layer transcoders (circuit-tracer's CLT layout, random weights written in the
test): the replacement model reproduces the real logits, every sampled edge equals the change at its target when its
source is removed from the frozen replacement model (computed from scratch here), a logit's edges plus its bias are
the logit, and a per-layer set written as a CLT with zero cross-layer decoders gives the per-layer set's graph."""
import numpy as np
import pytest
import torch
from graph_checks import assert_inputs_are_edges_plus_bias
from safetensors.numpy import save_file

from desktop_app.engine.attribution_graph import (EMBEDDING, ERROR, FEATURE, LOGIT, ReplacementContext,
                                                  _detached_run, build_graph)
from desktop_app.engine.jobs import drive
from desktop_app.engine.replay import record_run, run_from_layer
from desktop_app.engine.transcoder_formats import CrossLayerTranscoder
from desktop_app.engine.transcoders import Transcoder, TranscoderSet, load_transcoder_set

PROMPT = "When Mary and John went to the store, John gave a drink to"
D_T = 24


def clt_arrays(seed, n_layers, d, d_t=D_T, cross=True):
    """circuit-tracer CLT arrays: per layer i, W_enc_i [d_t, d], b_enc_i, b_dec_i, threshold_i and W_dec_i
    [d_t, n_layers - i, d]; with cross=False only the decoder into the feature's own layer is non-zero."""
    rng = np.random.default_rng(seed)
    enc, dec = [], []
    for i in range(n_layers):
        enc.append({f"W_enc_{i}": rng.normal(size=(d_t, d)) * 0.3, f"b_enc_{i}": rng.normal(size=d_t) * 0.1,
                    f"b_dec_{i}": rng.normal(size=d) * 0.1, f"threshold_{i}": np.abs(rng.normal(size=d_t)) * 0.5})
        w = rng.normal(size=(d_t, n_layers - i, d)) * 0.2
        if not cross:
            w[:, 1:] = 0.0
        dec.append({f"W_dec_{i}": w})
    f32 = lambda a: {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in a.items()}  # noqa: E731
    return [f32(e) for e in enc], [f32(x) for x in dec]


def write_clt(folder, enc, dec, hook_in="ln2.hook_normalized"):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model_kind: cross_layer_transcoder\nfeature_input_hook: {hook_in}\n"
                                        "feature_output_hook: hook_mlp_out\n")
    for i, (e, x) in enumerate(zip(enc, dec)):
        save_file(e, str(folder / f"W_enc_{i}.safetensors"))
        save_file(x, str(folder / f"W_dec_{i}.safetensors"))
    return folder


def reader(lm, L, hook_in):
    """The module whose input layer L's transcoders read, named here by hand: the MLP (its normalised input) or,
    for hook_resid_mid, the MLP's norm (GPT-2's ln_2, Llama's post_attention_layernorm)."""
    block = lm.adapter.blocks[L]
    if hook_in == "hook_resid_mid":
        return block.ln_2 if hasattr(block, "ln_2") else block.post_attention_layernorm
    return lm.adapter.mlp(L)


@pytest.fixture(scope="module", params=[("gpt2", "ln2.hook_normalized"), ("llama", "ln2.hook_normalized"),
                                        ("gpt2", "hook_resid_mid"), ("llama", "hook_resid_mid")])
def clt_case(request, tmp_path_factory):
    family, hook_in = request.param
    lm = request.getfixturevalue(f"lm_{family}")
    n, d = lm.info.n_layers, lm.info.d_model
    enc, dec = clt_arrays(7, n, d)
    folder = write_clt(tmp_path_factory.mktemp("clt") / family, enc, dec, hook_in)
    clt = load_transcoder_set(folder, n_layers=n, d_model=d)
    assert clt.config["feature_input_hook"] == hook_in
    assert isinstance(clt, CrossLayerTranscoder)
    ids = torch.tensor([lm.tokenize(PROMPT, True).ids])
    # few feature nodes: most active features are left out and folded into their error nodes
    graph = drive(build_graph(lm, ids, clt, max_feature_nodes=40, max_n_logits=4, desired_logit_prob=0.9,
                              batch_size=16))
    return lm, clt, ids, graph


def test_clt_replacement_reproduces_real_logits(clt_case):
    lm, clt, ids, graph = clt_case
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits[0, -1].float().numpy()
    np.testing.assert_allclose(graph.real_logits[-1], plain, atol=1e-5)
    np.testing.assert_allclose(graph.replacement_logits, plain, atol=1e-5)
    run = _detached_run(record_run(lm, ids))
    seen = {}
    with ReplacementContext(lm, clt) as ctx, torch.no_grad():
        run_from_layer(lm, run, 0, run.resid_pre[0])
        ctx.errors = [torch.zeros(1) for _ in range(len(clt))]
        ctx.set_mode("replacement")
        # hooks registered after the context's see the MLP outputs it wrote
        handles = [lm.adapter.mlp(L).register_forward_hook(
            lambda m, a, o, L=L: seen.__setitem__(L, (o[0] if isinstance(o, tuple) else o).clone()))
            for L in range(len(clt))]
        try:
            no_error = run_from_layer(lm, run, 0, run.resid_pre[0])[0].numpy()
        finally:
            for h in handles:
                h.remove()
        # without errors, the replacement's MLP outputs are the CLT's reconstruction from that run's MLP inputs
        expected = clt(list(ctx.mlp_in))
        for L in range(len(clt)):
            np.testing.assert_allclose(seen[L].numpy(), expected[L].numpy(), atol=1e-5)
    assert np.abs(no_error - plain).max() > 1e-3


def test_clt_logit_and_feature_inputs_are_edges_plus_bias(clt_case):
    _, _, _, graph = clt_case
    kinds = np.array(graph.node_kind)
    assert (kinds == FEATURE).sum() == 40
    assert_inputs_are_edges_plus_bias(graph)


def _frozen_inputs_clt(lm, clt, ids, graph, drop):
    """Every target's input in the frozen replacement model with source `drop` removed, from scratch: a feature
    (s, p, f) is removed from every MLP output l >= s it writes into; an error node (l, p) is layer l's error at p
    (the MLP output minus b_dec and every active feature's write into it) plus everything the active features read at
    (l, p) that are not graph nodes write (left-out features are folded into their error node)."""
    run = _detached_run(record_run(lm, ids))
    kinds = np.array(graph.node_kind)
    n_layers = len(clt)
    read, mlp_out = {}, {}  # what the transcoders read (hooked here by hand), the real MLP outputs
    handles = [reader(lm, L, clt.config["feature_input_hook"]).register_forward_pre_hook(
        lambda m, a, L=L: read.__setitem__(L, a[0])) for L in range(n_layers)]
    with ReplacementContext(lm, clt) as ctx, torch.no_grad():
        handles += [lm.adapter.mlp(L).register_forward_hook(
            lambda m, a, o, L=L: None if L in mlp_out else mlp_out.__setitem__(
                L, (o[0] if isinstance(o, tuple) else o).clone()))
            for L in range(n_layers)]
        run_from_layer(lm, run, 0, run.resid_pre[0])
        emb = run.resid_pre[0].clone()
        inject = [mlp_out[L].clone() for L in range(n_layers)]
        acts = [clt.encode(L, read[L][0]) for L in range(n_layers)]

        def remove_feature(s, p, f, a):
            for j in range(n_layers - s):
                inject[s + j][0, p] -= a * clt.W_dec[s][f, j]

        if drop is not None:
            L, p, f = int(graph.node_layer[drop]), int(graph.node_pos[drop]), int(graph.node_feature[drop])
            if kinds[drop] == EMBEDDING:
                emb[0, p] = 0
            elif kinds[drop] == FEATURE:
                remove_feature(L, p, f, float(graph.activation[drop]))
            else:
                written = clt.b_dec[L] + sum(acts[s][p] @ clt.W_dec[s][:, L - s] for s in range(L + 1))
                inject[L][0, p] -= mlp_out[L][0, p] - written
                nodes = {int(graph.node_feature[i]) for i in np.where((kinds == FEATURE) & (graph.node_layer == L)
                                                                      & (graph.node_pos == p))[0]}
                for g in torch.nonzero(acts[L][p]).reshape(-1).tolist():
                    if g not in nodes:
                        remove_feature(L, p, g, float(acts[L][p, g]))
        ctx.set_mode("frozen")
        ctx.mlp_inject = inject
        logits = run_from_layer(lm, run, 0, emb)[0].double()
        for h in handles:
            h.remove()
        out = np.zeros(graph.n)
        for t in np.where(np.isin(kinds, [LOGIT, FEATURE]))[0]:
            if kinds[t] == LOGIT:
                out[t] = logits[graph.node_feature[t]]
            else:
                L, f = int(graph.node_layer[t]), int(graph.node_feature[t])
                x = read[L][0, graph.node_pos[t]]
                out[t] = float(x @ clt.W_enc[L][f] + clt.b_enc[L][f])
    return out


def test_clt_edges_equal_finite_perturbations(clt_case):
    lm, clt, ids, graph = clt_case
    kinds = np.array(graph.node_kind)
    rng = np.random.default_rng(0)
    sources = []
    for kind in (FEATURE, ERROR, EMBEDDING):
        idx = np.where(kinds == kind)[0]
        strongest = idx[np.argsort(-np.abs(graph.adjacency[:, idx]).max(0))[:2]]
        sources += list(strongest) + list(rng.choice(idx, size=min(2, len(idx)), replace=False))
    # a feature of layer 0, whose writes reach every later layer
    sources.append(np.where((kinds == FEATURE) & (graph.node_layer == 0))[0][0])
    targets = np.where(np.isin(kinds, [LOGIT, FEATURE]))[0]
    base = _frozen_inputs_clt(lm, clt, ids, graph, drop=None)
    np.testing.assert_allclose(base[targets], graph.target_input[targets], atol=1e-4)
    for s in sources:
        without = _frozen_inputs_clt(lm, clt, ids, graph, drop=s)
        np.testing.assert_allclose(graph.adjacency[targets, s], base[targets] - without[targets], atol=3e-5,
                                   rtol=1e-4)
    assert np.abs(graph.adjacency[np.ix_(targets, sources)]).max() > 1e-3


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("max_feature_nodes,hook_in", [(10_000, "ln2.hook_normalized"), (30, "ln2.hook_normalized"),
                                                       (30, "hook_resid_mid")])
def test_per_layer_set_as_clt_gives_the_same_graph(family, max_feature_nodes, hook_in, request, tmp_path):
    lm = request.getfixturevalue(f"lm_{family}")
    n, d = lm.info.n_layers, lm.info.d_model
    enc, dec = clt_arrays(11, n, d, cross=False)
    clt = load_transcoder_set(write_clt(tmp_path / "clt", enc, dec, hook_in), n_layers=n, d_model=d)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    per_layer = TranscoderSet([Transcoder(t(enc[i][f"W_enc_{i}"]), t(dec[i][f"W_dec_{i}"][:, 0].copy()),
                                          t(enc[i][f"b_enc_{i}"]), t(enc[i][f"b_dec_{i}"]), "jumprelu",
                                          t(enc[i][f"threshold_{i}"])) for i in range(n)],
                               {"feature_input_hook": hook_in})
    ids = torch.tensor([lm.tokenize(PROMPT, True).ids])
    graphs = [drive(build_graph(lm, ids, s, max_feature_nodes=max_feature_nodes, max_n_logits=4,
                                desired_logit_prob=0.9, batch_size=16)) for s in (per_layer, clt)]
    a, b = graphs
    assert a.node_kind == b.node_kind and a.node_ids() == b.node_ids()
    if max_feature_nodes < 10_000:
        assert (np.array(a.node_kind) == FEATURE).sum() == max_feature_nodes
    np.testing.assert_allclose(a.activation, b.activation, atol=1e-6)
    np.testing.assert_allclose(a.adjacency, b.adjacency, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(a.bias, b.bias, atol=1e-5)
    np.testing.assert_allclose(a.target_input, b.target_input, atol=1e-5)
    np.testing.assert_allclose(a.replacement_logits, b.replacement_logits, atol=1e-5)
    np.testing.assert_allclose(a.replacement_logits, a.real_logits[-1], atol=1e-5)


# ---- clamp checks of CLT features --------------------------------------------------------------------------------

def _extras(graph):
    return {"node_ids": np.array(graph.node_ids()), "node_kind": np.array(graph.node_kind),
            "adjacency": graph.adjacency, "node_activation": graph.activation, "node_layer": graph.node_layer,
            "node_pos": graph.node_pos, "node_feature": graph.node_feature}


def test_clt_clamp_check_graph_model_and_real_model(clt_case):
    """On the full CLT graph: a small clamp of a layer-0 feature (which writes into every layer) moves the graph's own
    model exactly as the graph's path sum predicts; the real model's change equals the project's edit mechanism
    adding delta x the feature's decoder into every MLP output it writes (a different hook path)."""
    from desktop_app.engine.edits import add_direction, next_token_logits
    from desktop_app.engine.graph_check import clamp_check, predicted_logit_change
    from desktop_app.engine.jobs import CancelToken

    lm, clt, ids, _ = clt_case
    graph = drive(build_graph(lm, ids, clt, max_feature_nodes=100_000, max_n_logits=4, desired_logit_prob=0.9))
    ex = _extras(graph)
    f = np.where((ex["node_kind"] == FEATURE) & (ex["node_layer"] == 0))[0]
    size = [np.abs(predicted_logit_change(ex, str(ex["node_ids"][i]), 1.0)[0]).max() for i in f]
    informative = 0
    for i in f[np.argsort(size)[::-1][:3]]:
        L, p, feat = int(ex["node_layer"][i]), int(ex["node_pos"][i]), int(ex["node_feature"][i])
        delta = 1e-2 * float(ex["node_activation"][i])
        c = clamp_check(lm, ids[0].tolist(), clt, ex, str(ex["node_ids"][i]), delta)
        if not c["crossings"]:
            np.testing.assert_allclose(c["measured_graph"], c["predicted"],
                                       atol=2e-6 + 1e-5 * np.abs(c["predicted"]).max())
            informative += np.abs(c["predicted"]).max() > 1e-4
        edits = {f"blocks.{L + j}.mlp_out": add_direction(clt.W_dec[L][feat, j].numpy(), delta, [p])
                 for j in range(len(clt) - L)}
        base = next_token_logits(lm, ids, None, CancelToken())
        edited = next_token_logits(lm, ids, edits, CancelToken())
        np.testing.assert_allclose(c["measured_real"], (edited - base).double().numpy()[c["logit_tokens"]],
                                   atol=1e-5)
    assert informative >= 1


def test_per_layer_sets_reading_resid_mid_load_save_and_are_refused_where_not_handled(lm_neox, lm_gpt2, tmp_path):
    from desktop_app.engine.errors import SAEError, SpecError
    from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job
    from desktop_app.engine.transcoders import save_transcoder_set

    n, d = lm_neox.info.n_layers, lm_neox.info.d_model
    enc, dec = clt_arrays(3, n, d, cross=False)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    tset = TranscoderSet([Transcoder(t(enc[i][f"W_enc_{i}"]), t(dec[i][f"W_dec_{i}"][:, 0].copy()),
                                     t(enc[i][f"b_enc_{i}"]), t(enc[i][f"b_dec_{i}"])) for i in range(n)],
                         {"feature_input_hook": "hook_resid_mid"})
    folder = save_transcoder_set(tset, tmp_path / "mid")
    again = load_transcoder_set(folder, n_layers=n, d_model=d)
    assert again.config["feature_input_hook"] == "hook_resid_mid"
    ids = torch.tensor([lm_neox.tokenize(PROMPT, True).ids])
    with pytest.raises(SpecError, match="read hook_resid_mid, which this model does not have") as e:
        drive(build_graph(lm_neox, ids, again))
    assert str(e.value).count(". ") == 0
    (tmp_path / "corpus.txt").write_text("Mary went to the store.\n")
    with pytest.raises(SpecError, match="read hook_resid_mid, which this model does not have"):  # feature cards too
        drive(transcoder_dashboards_job(lm_neox, again, tmp_path / "corpus.txt", features=[(0, 1)]))
    (folder / "config.yaml").write_text((folder / "config.yaml").read_text().replace("hook_resid_mid",
                                                                                     "hook_resid_pre"))
    with pytest.raises(SAEError, match="read 'hook_resid_pre'"):
        load_transcoder_set(folder)
