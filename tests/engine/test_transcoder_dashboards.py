"""Transcoder feature dashboards (the graph's feature cards) on the tiny GPT-2, checked by brute force: every
document run alone, its MLP inputs read from the model's own ln_2 module, every token encoded, sorted; output
tokens by a numpy product through the final LayerNorm's weight and the unembedding."""
import numpy as np
import pytest
import torch
from dashboard_checks import check_cards_against_brute_force

from desktop_app import demo_task
from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.sae.corpus import tokenize_documents
from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job
from desktop_app.engine.transcoders import fit_transcoders, load_transcoder_set, save_transcoder_set

FEATURES = [(1, 5), (0, 3), (1, 0), (0, 11), (0, 7)]  # mixed layers, out of order
N_TOP, CONTEXT = 4, 3


@pytest.fixture(scope="module")
def setup(lm_gpt2, tmp_path_factory):
    root = tmp_path_factory.mktemp("tcdash")
    texts = demo_task.corpus(16, seed=2)
    ids = [i[:12] for i in (lm_gpt2.tokenize(t, True).ids for t in texts) if len(i) >= 12]
    tset = drive(fit_transcoders(lm_gpt2, [torch.tensor(ids)], d_transcoder=24, k=4, steps=60))
    folder = save_transcoder_set(tset, root / "tc", model_name="gpt2")
    corpus = root / "corpus.txt"
    corpus_texts = demo_task.corpus(37, seed=4)  # 37 documents: the last batch of 8 is short
    corpus.write_text("\n".join(corpus_texts))
    dash = drive(transcoder_dashboards_job(lm_gpt2, folder, corpus, features=FEATURES, n_top=N_TOP,
                                           context=CONTEXT, batch_size=8, n_logit=6))
    return lm_gpt2, load_transcoder_set(folder), folder, corpus, corpus_texts, dash


def brute_force(lm, tset, texts):
    """Per document alone: per layer the transcoder activations [tokens, d_transcoder]."""
    docs = tokenize_documents(lm, texts, 128)
    blocks = lm.model.transformer.h
    acts = []
    for doc in docs:
        got = {}
        handles = [blocks[L].ln_2.register_forward_hook(lambda _m, _a, out, L=L: got.__setitem__(L, out[0]))
                   for L in range(len(blocks))]
        try:
            with torch.no_grad():
                lm.model(input_ids=torch.tensor([doc]))
        finally:
            for h in handles:
                h.remove()
        acts.append({L: tset.layers[L].encode(got[L]).numpy() for L in got})
    return docs, acts


def test_contexts_and_densities_equal_brute_force(setup):
    lm, tset, _folder, _corpus, texts, dash = setup
    docs, acts = brute_force(lm, tset, texts)
    fired_any, _partial = check_cards_against_brute_force(lm, dash, docs, acts, FEATURES, N_TOP, atol=1e-5,
                                                           context=CONTEXT)
    assert fired_any >= 3  # the check is not vacuous


def test_promoted_and_suppressed_tokens_equal_a_numpy_product(setup):
    lm, tset, *_rest, dash = setup
    w_u = lm.model.lm_head.weight.detach().numpy().astype(np.float64)
    gamma = lm.model.transformer.ln_f.weight.detach().numpy().astype(np.float64)
    for d in dash:
        w = tset.layers[d.layer].W_dec[d.feature].numpy().astype(np.float64)
        effect = w_u @ ((w - w.mean()) * gamma)
        up, down = np.argsort(-effect)[:6], np.argsort(effect)[:6]
        assert [t for t, _ in d.promoted] == lm.tokens_of_ids(up.tolist()).display
        assert [t for t, _ in d.suppressed] == lm.tokens_of_ids(down.tolist()).display
        np.testing.assert_allclose([v for _, v in d.promoted], effect[up], atol=1e-5)
        np.testing.assert_allclose([v for _, v in d.suppressed], effect[down], atol=1e-5)


def test_every_feature_by_default_and_bad_features_refused(setup):
    lm, tset, folder, corpus, _texts, dash = setup
    every = drive(transcoder_dashboards_job(lm, tset, corpus, n_top=2, context=1, batch_size=16, n_logit=2))
    assert [(d.layer, d.feature) for d in every] == [(L, f) for L in range(2) for f in range(24)]
    by_key = {(d.layer, d.feature): d for d in every}
    for d in dash:  # another batch size and context give the same densities and best activations
        assert by_key[(d.layer, d.feature)].density == pytest.approx(d.density, abs=1e-12)
        np.testing.assert_allclose([c.activation for c in by_key[(d.layer, d.feature)].top_contexts],
                                   [c.activation for c in d.top_contexts[:2]], atol=1e-5)
    with pytest.raises(SAEError, match="layers 0-1"):
        drive(transcoder_dashboards_job(lm, folder, corpus, features=[(2, 0)]))
    with pytest.raises(SAEError, match="features 0-23"):
        drive(transcoder_dashboards_job(lm, folder, corpus, features=["0:24"]))


def test_cancel_keeps_what_was_scanned(setup):
    lm, tset, _folder, corpus, texts, _dash = setup
    cancel = CancelToken()
    job = transcoder_dashboards_job(lm, tset, corpus, features=FEATURES, batch_size=8, cancel=cancel)
    batches = 0
    try:
        while True:
            event = next(job)
            if getattr(event, "message", "").startswith("dashboards: batch"):
                batches += 1
                if batches == 2:
                    cancel.cancel()
    except StopIteration as stop:
        partial = stop.value
    assert [(d.layer, d.feature) for d in partial] == FEATURES
    docs = tokenize_documents(lm, texts, 128)
    assert partial[0].n_tokens == sum(len(d) for d in docs[:8])  # the first batch of 8 documents, not all 37


def test_llama_rmsnorm_model(lm_llama, tmp_path):
    """Grouped-query Llama: the MLP input is post_attention_layernorm's output; the final RMSNorm is not centred."""
    texts = demo_task.corpus(12, seed=5)
    ids = [i[:10] for i in (lm_llama.tokenize(t, True).ids for t in texts) if len(i) >= 10]
    tset = drive(fit_transcoders(lm_llama, [torch.tensor(ids)], d_transcoder=16, k=3, steps=40))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(9, seed=6)))
    features = [(1, 2), (0, 4), (1, 9)]
    dash = drive(transcoder_dashboards_job(lm_llama, tset, corpus, features=features, n_top=3, context=2,
                                           batch_size=4, n_logit=4))
    docs = tokenize_documents(lm_llama, demo_task.corpus(9, seed=6), 128)
    layers = lm_llama.model.model.layers
    per_doc = []
    for doc in docs:
        got = {}
        handles = [layers[L].post_attention_layernorm.register_forward_hook(
            lambda _m, _a, out, L=L: got.__setitem__(L, out[0])) for L in range(len(layers))]
        try:
            with torch.no_grad():
                lm_llama.model(input_ids=torch.tensor([doc]))
        finally:
            for h in handles:
                h.remove()
        per_doc.append({L: tset.layers[L].encode(got[L]).numpy() for L in got})
    w_u = lm_llama.model.lm_head.weight.detach().numpy().astype(np.float64)
    gamma = lm_llama.model.model.norm.weight.detach().numpy().astype(np.float64)
    n_tokens = sum(len(d) for d in docs)
    assert sum(d.density > 0 for d in dash) >= 2  # not vacuous
    for d in dash:
        acts = [a[d.layer][:, d.feature] for a in per_doc]
        assert d.density == pytest.approx(sum(int((a > 0).sum()) for a in acts) / n_tokens, abs=1e-12)
        best = np.array([a.max() for a in acts])
        np.testing.assert_allclose([c.activation for c in d.top_contexts],
                                   sorted(best[best > 0], reverse=True)[:3], atol=1e-5)
        effect = w_u @ (tset.layers[d.layer].W_dec[d.feature].numpy().astype(np.float64) * gamma)
        up = np.argsort(-effect)[:4]
        assert [t for t, _ in d.promoted] == lm_llama.tokens_of_ids(up.tolist()).display
        np.testing.assert_allclose([v for _, v in d.promoted], effect[up], atol=1e-5)
