"""TCAV: gradients against finite differences, the t-test against known values, and a concept the target
depends on by construction against a random one."""
import math

import numpy as np
import pytest
import torch

from desktop_app.engine.activations_dataset import tokenize_texts
from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.stats import betainc, t_cdf, t_sf_two_sided, ttest_ind
from desktop_app.engine.tcav import draw_random_sets, target_gradients, tcav_job
from planted import planted, random_texts


def test_t_distribution_known_values():
    # tables: two-sided p of t = 2.0 with 10 df, and the 5 % critical values of 10 and 30 df
    assert t_sf_two_sided(2.0, 10) == pytest.approx(0.07338803477074, abs=1e-10)
    assert t_sf_two_sided(2.228138851986, 10) == pytest.approx(0.05, abs=1e-9)
    assert t_sf_two_sided(2.042272456301, 30) == pytest.approx(0.05, abs=1e-9)
    for t in (-4.0, -0.3, 0.0, 1.5, 12.0):  # closed forms: Cauchy (1 df) and 2 df
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)
    assert betainc(2, 3, 0.4) == pytest.approx(0.5248, abs=1e-12)  # binomial sum


def test_ttest_matches_formula_and_edge_cases():
    a, b = [0.9, 1.0, 0.8, 0.95], [0.5, 0.6, 0.4, 0.55, 0.45]
    t, p = ttest_ind(a, b)
    na, nb = len(a), len(b)
    sp = ((na - 1) * np.var(a, ddof=1) + (nb - 1) * np.var(b, ddof=1)) / (na + nb - 2)
    assert t == pytest.approx((np.mean(a) - np.mean(b)) / math.sqrt(sp * (1 / na + 1 / nb)), rel=1e-12)
    assert p == pytest.approx(t_sf_two_sided(t, na + nb - 2), rel=1e-12)
    assert ttest_ind([1, 1, 1], [1, 1]) [1] == 1.0
    assert ttest_ind([1, 1, 1], [0, 0])[1] == 0.0


def test_target_gradients_match_finite_differences(lm_llama):
    lm = lm_llama
    texts = ["Mary went to the park", "John and Alice went to the school"]
    docs = tokenize_texts(lm, texts)
    target = lm.single_token_id(" Mary")
    grads = drive(target_gradients(lm, docs, "resid_pre", target, batch_size=2))
    u = torch.randn(lm.info.d_model, generator=torch.Generator().manual_seed(0))
    eps = 1e-3  # float32: curvature error ~eps^2, rounding ~1e-7 / eps
    for layer in range(lm.info.n_layers):
        for row, ids in enumerate(docs):
            def logit(sign):
                def add(act):
                    act = act.clone()
                    act[:, -1] += sign * eps * u
                    return act
                with torch.no_grad(), hooks(lm, write={f"blocks.{layer}.hook_resid_pre": add}):
                    return float(forward_logits(lm, torch.tensor([ids]))[0, -1, target])
            fd = (logit(1) - logit(-1)) / (2 * eps)
            assert float(grads[layer, row] @ u.numpy()) == pytest.approx(fd, rel=1e-3, abs=1e-3)


def test_random_sets_are_seeded_and_disjoint_when_possible():
    a = draw_random_sets(100, 10, 5, seed=1)
    b = draw_random_sets(100, 10, 5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(np.unique(np.concatenate(a))) == 50
    small = draw_random_sets(12, 10, 5, seed=1)
    assert all(len(np.unique(s)) == 10 for s in small)


def _setup(lm, seed=0):
    corpus = random_texts(lm, 200, seed)
    concept, corpus, inputs = corpus[:30], corpus[30:170], corpus[170:]
    return concept, corpus, inputs


def test_tcav_concept_the_target_depends_on(lm_llama):
    lm = lm_llama
    last = lm.info.n_layers - 1
    concept, corpus, inputs = _setup(lm)
    target = " Mary"
    # the direction along which the target's logit grows, for these inputs: their mean unit gradient
    grads = drive(target_gradients(lm, tokenize_texts(lm, inputs), "resid_post", lm.single_token_id(target)))[last]
    v = (grads / np.linalg.norm(grads, axis=1, keepdims=True)).mean(0)
    v /= np.linalg.norm(v)
    assert np.all(grads @ v > 0)  # the construction: the target depends on v for every input
    hook = f"blocks.{last}.hook_resid_post"
    with planted(lm, hook, {t: 4.0 * v for t in concept}):
        r = drive(tcav_job(lm, concept, corpus, inputs, target, hook="resid_post", runs=6, random_size=20, seed=0))
        random_concept = corpus[:30]
        r0 = drive(tcav_job(lm, random_concept, corpus[30:], inputs, target, hook="resid_post", runs=6,
                            random_size=20, seed=0))
    assert r.shape == (lm.info.n_layers,)
    assert r.values[last] >= 0.95
    assert r.extras["p_value"][last] < 0.05 and bool(r.extras["significant"][last])
    assert r.extras["concept_scores"].shape == (6, lm.info.n_layers)
    assert r0.extras["p_value"][last] >= 0.05 and not bool(r0.extras["significant"][last])
    # Bonferroni multiplies by the number of layers
    rb = drive(tcav_job(lm, random_concept, corpus[30:], inputs, target, runs=6, random_size=20, seed=0,
                        bonferroni=True))
    np.testing.assert_allclose(rb.extras["p_value_adjusted"], np.minimum(1, r0.extras["p_value"] * 2), rtol=1e-6)


def test_tcav_bad_input(lm_gpt2):
    texts = ["Mary went home", "John went home", "Alice went home"]
    with pytest.raises(SpecError, match="concept texts is empty"):
        drive(tcav_job(lm_gpt2, [], texts, texts, " Mary"))
    with pytest.raises(SpecError, match="each random set needs"):
        drive(tcav_job(lm_gpt2, texts, texts[:2], texts, " Mary"))
    with pytest.raises(PromptError, match="not one"):
        drive(tcav_job(lm_gpt2, texts, texts * 10, texts, "Mary went"))
    with pytest.raises(SpecError, match="at least 2"):
        drive(tcav_job(lm_gpt2, texts, texts * 10, texts, " Mary", runs=1))
    with pytest.raises(PromptError, match="context"):
        drive(tcav_job(lm_gpt2, texts, texts * 10, [" ".join(["Mary"] * 1100)], " Mary"))


def _hook_count(lm):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


def test_cancel_stops_collection_and_gradients_and_removes_hooks(lm_gpt2):
    from desktop_app.engine.activations_dataset import collect_pooled
    from desktop_app.engine.errors import JobCancelled
    from desktop_app.engine.jobs import CancelToken

    texts = [f"Mary went to the park {i}" for i in range(8)]
    before = _hook_count(lm_gpt2)
    for make in (lambda c: collect_pooled(lm_gpt2, texts, batch_size=2, cancel=c),
                 lambda c: target_gradients(lm_gpt2, tokenize_texts(lm_gpt2, texts), "resid_post",
                                            lm_gpt2.single_token_id(" Mary"), batch_size=2, cancel=c)):
        cancel = CancelToken()
        job = make(cancel)
        next(job)  # the first batch's progress
        cancel.cancel()
        with pytest.raises(JobCancelled):
            drive(job)
        assert _hook_count(lm_gpt2) == before
