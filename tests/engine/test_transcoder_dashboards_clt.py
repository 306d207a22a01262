"""Feature cards of cross-layer transcoders and of sets reading hook_resid_mid (random weights written in the test, on
the tiny GPT-2 and Llama), checked by brute force: every document run alone, what the transcoders read taken from the
model's own MLP norm module by hand (its input for hook_resid_mid, its output otherwise), every token encoded in numpy
from the written arrays, sorted; output tokens by a numpy product of the summed decoder rows through the final norm's
weight and the unembedding."""
import numpy as np
import pytest
import torch
from dashboard_checks import check_cards_against_brute_force
from test_attribution_graph_clt import clt_arrays, write_clt

from desktop_app import demo_task
from desktop_app.engine.jobs import drive
from desktop_app.engine.sae.corpus import tokenize_documents
from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job
from desktop_app.engine.transcoders import Transcoder, TranscoderSet, load_transcoder_set, save_transcoder_set

N_TOP, CONTEXT, N_LOGIT = 4, 2, 5
FEATURES = [(1, 5), (0, 3), (1, 0), (0, 11), (0, 7), (0, 20)]  # mixed layers, out of order


def mlp_norm(lm, L):
    block = lm.adapter.blocks[L]
    return block.ln_2 if hasattr(block, "ln_2") else block.post_attention_layernorm


def final_effect(lm, direction):
    """direction [d_model] float64 -> its logit effect through the final norm's weight and W_U (GPT-2's LayerNorm
    centres, Llama's RMSNorm does not)."""
    w_u = lm.model.lm_head.weight.detach().numpy().astype(np.float64)
    if hasattr(lm.model, "transformer"):
        gamma = lm.model.transformer.ln_f.weight.detach().numpy().astype(np.float64)
        direction = direction - direction.mean()
    else:
        gamma = lm.model.model.norm.weight.detach().numpy().astype(np.float64)
    return w_u @ (direction * gamma)


def brute_force(lm, texts, hook_in, enc):
    """Per document alone: per layer the activations [tokens, d_transcoder], encoded in numpy from the arrays."""
    docs = tokenize_documents(lm, texts, 128)
    n = lm.info.n_layers
    acts = []
    for doc in docs:
        got = {}
        if hook_in == "hook_resid_mid":
            handles = [mlp_norm(lm, L).register_forward_pre_hook(lambda _m, a, L=L: got.__setitem__(L, a[0][0]))
                       for L in range(n)]
        else:
            handles = [mlp_norm(lm, L).register_forward_hook(lambda _m, _a, out, L=L: got.__setitem__(L, out[0]))
                       for L in range(n)]
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([doc]))
        finally:
            for h in handles:
                h.remove()
        per_layer = {}
        for L in range(n):
            x = got[L].double().numpy()
            pre = x @ enc[L][f"W_enc_{L}"].astype(np.float64).T + enc[L][f"b_enc_{L}"]
            per_layer[L] = pre * (pre > enc[L][f"threshold_{L}"])
        acts.append(per_layer)
    return docs, acts


def check_contexts(lm, dash, docs, acts, features):
    _fired, partial = check_cards_against_brute_force(lm, dash, docs, acts, features, N_TOP, atol=1e-4, rtol=1e-5)
    assert partial >= 3  # the densities are not all 0 or all 1: the check is not vacuous


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    texts = demo_task.corpus(11, seed=8)  # 11 documents in batches of 4: the last batch is short
    path = tmp_path_factory.mktemp("cards_corpus") / "corpus.txt"
    path.write_text("\n".join(texts))
    return path, texts


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("hook_in", ["ln2.hook_normalized", "hook_resid_mid"])
def test_clt_cards_equal_brute_force(family, hook_in, request, corpus, tmp_path):
    lm = request.getfixturevalue(f"lm_{family}")
    n, d = lm.info.n_layers, lm.info.d_model
    enc, dec = clt_arrays(11, n, d)
    folder = write_clt(tmp_path / "clt", enc, dec, hook_in)
    path, texts = corpus
    dash = drive(transcoder_dashboards_job(lm, folder, path, features=FEATURES, n_top=N_TOP, context=CONTEXT,
                                           batch_size=4, n_logit=N_LOGIT))
    docs, acts = brute_force(lm, texts, hook_in, enc)
    check_contexts(lm, dash, docs, acts, FEATURES)
    for card in dash:
        s, f = card.layer, card.feature
        effect = final_effect(lm, dec[s][f"W_dec_{s}"][f].astype(np.float64).sum(0))
        up, down = np.argsort(-effect)[:N_LOGIT], np.argsort(effect)[:N_LOGIT]
        assert [t for t, _ in card.promoted] == lm.tokens_of_ids(up.tolist()).display
        assert [t for t, _ in card.suppressed] == lm.tokens_of_ids(down.tolist()).display
        np.testing.assert_allclose([v for _, v in card.promoted], effect[up], atol=1e-5)
        np.testing.assert_allclose([v for _, v in card.suppressed], effect[down], atol=1e-5)
        if s < n - 1:
            assert f"summed over layers {s}..{n - 1}" in card.output_note
        else:
            assert f"layer {s}, the last" in card.output_note
    # the summed rows differ from the feature's own-layer row: the check tells the two apart
    s, f = 0, FEATURES[1][1]
    own = final_effect(lm, dec[s][f"W_dec_{s}"][f, 0].astype(np.float64))
    card = next(c for c in dash if (c.layer, c.feature) == (s, f))
    assert [t for t, _ in card.promoted] != lm.tokens_of_ids(np.argsort(-own)[:N_LOGIT].tolist()).display


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_per_layer_resid_mid_cards_equal_brute_force(family, request, corpus, tmp_path):
    lm = request.getfixturevalue(f"lm_{family}")
    n, d = lm.info.n_layers, lm.info.d_model
    enc, dec = clt_arrays(5, n, d, cross=False)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    tset = TranscoderSet([Transcoder(t(enc[i][f"W_enc_{i}"]), t(dec[i][f"W_dec_{i}"][:, 0].copy()),
                                     t(enc[i][f"b_enc_{i}"]), t(enc[i][f"b_dec_{i}"]), activation="jumprelu",
                                     threshold=t(enc[i][f"threshold_{i}"])) for i in range(n)],
                         {"feature_input_hook": "hook_resid_mid"})
    folder = save_transcoder_set(tset, tmp_path / "mid")
    assert load_transcoder_set(folder).config["feature_input_hook"] == "hook_resid_mid"
    path, texts = corpus
    dash = drive(transcoder_dashboards_job(lm, folder, path, features=FEATURES, n_top=N_TOP, context=CONTEXT,
                                           batch_size=4, n_logit=N_LOGIT))
    docs, acts = brute_force(lm, texts, "hook_resid_mid", enc)
    check_contexts(lm, dash, docs, acts, FEATURES)
    for card in dash:
        effect = final_effect(lm, dec[card.layer][f"W_dec_{card.layer}"][card.feature, 0].astype(np.float64))
        up = np.argsort(-effect)[:N_LOGIT]
        assert [t for t, _ in card.promoted] == lm.tokens_of_ids(up.tolist()).display
        np.testing.assert_allclose([v for _, v in card.promoted], effect[up], atol=1e-5)
        assert card.output_note == ""
