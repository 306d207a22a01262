"""Feature dashboards on the tiny GPT-2, checked by brute force: every document run alone, every token encoded."""
import json

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.sae.corpus import tokenize_documents
from desktop_app.engine.sae.dashboards import FeatureDashboard, build_dashboards_job, search
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.model import SAE, SAEConfig

HOOK = "blocks.1.hook_resid_pre"
FEATURES = [0, 3, 5, 7, 11]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(gpt2_dir, tmp_path_factory):
    lm = load_model(gpt2_dir, dtype="float32", device="cpu")
    root = tmp_path_factory.mktemp("dash")
    g = torch.Generator().manual_seed(1)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=16, hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sae.b_enc -= 0.6  # sparser features, so that density is not trivially 1
    folder = save_saelens(sae, root / "sae")
    corpus = root / "corpus.txt"
    texts = demo_task.corpus(37, seed=4)  # 37: the last batch is short
    corpus.write_text("\n".join(texts))
    dash = drive(build_dashboards_job(lm, folder, corpus, features=FEATURES, n_top=4, context=3, batch_size=8))
    return lm, load_sae(folder), texts, dash


def brute_force(lm, sae, texts):
    docs = tokenize_documents(lm, texts, 128)
    acts = []
    for doc in docs:
        _, cache = run_with_cache(lm, [doc], [HOOK])
        acts.append(sae.encode(cache[HOOK][0]).numpy())
    return docs, acts


def test_top_context_is_where_the_feature_fires_most(setup):
    lm, sae, texts, dash = setup
    docs, acts = brute_force(lm, sae, texts)
    assert [d.feature for d in dash] == FEATURES
    assert sum(d.max_activation > 0 for d in dash) >= 3
    for d in dash:
        per_doc = np.array([a[:, d.feature].max() for a in acts])
        assert d.max_activation == pytest.approx(per_doc.max(), abs=1e-5)
        if per_doc.max() <= 0:
            assert d.top_contexts == [] and d.density == 0
            continue
        top = d.top_contexts[0]
        best = top.document  # documents may tie (every sentence starts with the same words)
        assert top.activation == pytest.approx(per_doc.max(), abs=1e-5)
        assert acts[best][top.position, d.feature] == pytest.approx(top.activation, abs=1e-5)
        assert acts[best][:, d.feature].max() == pytest.approx(top.activation, abs=1e-5)
        assert top.tokens[top.max_index] == lm.tokens_of_ids([docs[best][top.position]]).display[0]
        assert top.activations[top.max_index] == pytest.approx(top.activation, abs=1e-5)
        lo = top.position - top.max_index
        assert lo == max(0, top.position - 3)
        np.testing.assert_allclose(top.activations, acts[best][lo:lo + len(top.tokens), d.feature], atol=1e-5)
        # the next contexts are the next-best documents, in order
        expected = sorted(per_doc[per_doc > 0], reverse=True)[:4]
        np.testing.assert_allclose([c.activation for c in d.top_contexts], expected, atol=1e-5)
        fired = sum(int((a[:, d.feature] > 0).sum()) for a in acts)
        n_tok = sum(len(a) for a in acts)
        assert d.n_tokens == n_tok and d.density == pytest.approx(fired / n_tok)
        assert sum(d.histogram_counts) == fired


def test_output_tokens_follow_the_decoder_through_ln_final_and_unembed(setup):
    lm, sae, _, dash = setup
    ln = lm.model.transformer.ln_f.weight.detach()
    w_u = lm.model.lm_head.weight.detach()
    for d in dash[:2]:
        v = sae.W_dec[d.feature]
        effect = w_u @ ((v - v.mean()) * ln)
        assert d.promoted[0][0] == lm.tokens_of_ids([int(effect.argmax())]).display[0]
        assert d.promoted[0][1] == pytest.approx(float(effect.max()), rel=1e-4)
        assert d.suppressed[0][1] == pytest.approx(float(effect.min()), rel=1e-4)


def test_round_trip_and_search(setup):
    *_, dash = setup
    back = [FeatureDashboard.from_dict(json.loads(json.dumps(d.to_dict()))) for d in dash]
    assert back == dash
    live = next(d for d in dash if d.top_contexts)
    word = live.top_contexts[0].tokens[live.top_contexts[0].max_index]
    assert live in search(dash, word.replace("·", " "))
    dead = [d for d in dash if not d.top_contexts]
    assert all(d not in search(dash, word) for d in dead if word not in "".join(t for t, _ in d.promoted))
    assert search(dash, str(dash[1].feature))[0].feature == dash[1].feature
    assert search(dash, "zzzz-not-there") == []


def test_cancel_returns_what_was_scanned(setup, tmp_path):
    lm, sae, texts, _ = setup
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(texts))
    cancel = CancelToken()
    job = build_dashboards_job(lm, sae, corpus, features=[0], batch_size=8, cancel=cancel)
    events = []

    def on_event(e):
        events.append(e)
        if len(events) == 2:
            cancel.cancel()

    out = drive(job, on_event)
    assert len(out) == 1 and 0 < out[0].n_tokens < sum(len(d) for d in tokenize_documents(lm, texts, 128))
