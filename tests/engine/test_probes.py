"""Linear probes: the logistic fit against a Newton reference, and a planted direction found where it is."""
import json

import numpy as np
import pytest

from desktop_app.engine.activations_dataset import collect_pooled, pool
from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.logistic import fit_logistic
from desktop_app.engine.probes import probe_job, stratified_split
from planted import planted, random_texts


def newton_binary(z, y, penalty, iters=50):
    """Reference: minimise mean log-loss(sigmoid(z u + c)) + penalty / 2 |u|^2 by Newton's method (numpy)."""
    n, d = z.shape
    a = np.hstack([z, np.ones((n, 1))])
    theta = np.zeros(d + 1)
    reg = np.diag(np.r_[np.full(d, penalty), 0.0])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-a @ theta))
        grad = a.T @ (p - y) / n + reg @ theta
        hess = (a.T * (p * (1 - p))) @ a / n + reg
        theta -= np.linalg.solve(hess, grad)
    return theta[:d], theta[d]


def test_binary_fit_matches_newton():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 10)) * rng.uniform(0.5, 3, size=10) + rng.normal(size=10)
    y = (x @ rng.normal(size=10) + rng.normal(size=120) > 0).astype(int)
    l2 = 0.05
    m = fit_logistic(x, y, 2, l2=l2)
    mean, std = x.mean(0), x.std(0)
    u, c = newton_binary((x - mean) / std, y, l2 / 2)  # two softmax rows w1 = -w0 = u / 2: penalty l2 / 4 |u|^2
    np.testing.assert_allclose(m.coef[1] - m.coef[0], u / std, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(m.intercept[1] - m.intercept[0], c - (u * mean / std).sum(), rtol=1e-5, atol=1e-7)


def test_multinomial_fit_is_stationary():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(90, 6))
    y = rng.integers(0, 3, size=90)
    l2 = 0.1
    m = fit_logistic(x, y, 3, l2=l2)
    mean, std = x.mean(0), x.std(0)
    z = (x - mean) / std
    w = m.coef * std  # back to standardised space
    logits = x @ m.coef.T + m.intercept
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(3)[y]
    grad_w = (p - onehot).T @ z / len(y) + l2 * w
    grad_b = (p - onehot).mean(0)
    assert np.abs(grad_w).max() < 1e-5 and np.abs(grad_b).max() < 1e-5
    assert m.converged


@pytest.mark.parametrize("fixture", ["lm_gpt2", "stories_lm"])
def test_pooling_reads_only_real_positions(request, fixture):
    lm_gpt2 = request.getfixturevalue(fixture)
    texts = ["Mary went to the park", "John", "Alice and Bob went to the school together"]
    acts = drive(collect_pooled(lm_gpt2, texts, "resid_post", "mean", batch_size=3))
    last = drive(collect_pooled(lm_gpt2, texts, "resid_post", "last", batch_size=2))
    for i, text in enumerate(texts):
        ids = lm_gpt2.tokenize(text).ids
        _, cache = run_with_cache(lm_gpt2, [ids], ["blocks.1.hook_resid_post"])
        ref = cache["blocks.1.hook_resid_post"][0].numpy()
        start = 1 if ids[0] == lm_gpt2.tokenizer.bos_token_id and len(ids) > 1 else 0  # a leading BOS is left out
        np.testing.assert_allclose(acts[1, i], ref[start:].mean(0), atol=1e-5)
        np.testing.assert_allclose(last[1, i], ref[-1], atol=1e-5)


@pytest.fixture(scope="module")
def stories_lm(stories_dir):
    from desktop_app.engine.loading import load_model

    return load_model(stories_dir, dtype="float32", device="cpu")


def test_cache_is_reused_and_keyed(lm_gpt2, tmp_path):
    texts = ["Mary went to the park", "John went home"]
    a = drive(collect_pooled(lm_gpt2, texts, "resid_pre", "last", cache_dir=tmp_path))
    files = list(tmp_path.glob("*.npy"))
    assert len(files) == 1
    events = []
    b = drive(collect_pooled(lm_gpt2, texts, "resid_pre", "last", cache_dir=tmp_path), events.append)
    np.testing.assert_array_equal(a, b)
    assert "cache" in events[0].message
    drive(collect_pooled(lm_gpt2, texts, "resid_pre", "mean", cache_dir=tmp_path))
    drive(collect_pooled(lm_gpt2, texts[:1], "resid_pre", "last", cache_dir=tmp_path))
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_cache_key_tells_a_quantised_load_apart(lm_gpt2, monkeypatch):
    from desktop_app.engine.activations_dataset import model_fingerprint

    plain = model_fingerprint(lm_gpt2)
    monkeypatch.setattr(lm_gpt2.info, "quantize", "int8")
    assert model_fingerprint(lm_gpt2) != plain


def _planted_dataset(lm, n=80, seed=0):
    texts = random_texts(lm, n, seed)
    labels = np.random.default_rng(seed + 1).permutation(np.arange(n) % 2)
    v = np.random.default_rng(seed + 2).normal(size=lm.info.d_model)
    v /= np.linalg.norm(v)
    return texts, labels, v


@pytest.mark.parametrize("plant_layer", [0, 1])
def test_probe_finds_planted_direction_at_and_after_its_layer(lm_llama, plant_layer):
    lm = lm_llama
    texts, labels, v = _planted_dataset(lm)
    scale = 3.0
    offsets = {t: (scale if y else -scale) * v for t, y in zip(texts, labels)}
    with planted(lm, f"blocks.{plant_layer}.hook_resid_pre", offsets):
        r = drive(probe_job(lm, list(zip(texts, labels.astype(str))), hook="resid_pre", seed=0))
    assert r.dims == ["layer"] and r.shape == (2,)
    control = r.extras["control_accuracy"]
    for layer in range(2):
        if layer >= plant_layer:
            assert r.values[layer] >= 0.95, r.values
            if layer == plant_layer:  # the probe's normal leans on the planted direction (chance: ~0.13)
                assert float(r.extras["directions"][layer] @ v) > 0.3
        else:
            assert r.values[layer] <= 0.75, r.values
        assert control[layer] <= 0.75, control
    assert r.extras["confusion"].shape == (2, 2, 2)
    assert r.extras["confusion"][1].sum() == len(r.extras["test_index"])
    assert np.all(r.extras["selectivity"][plant_layer:] > 0.2)


def test_probe_reads_csv_and_jsonl(lm_gpt2, tmp_path):
    rows = [("Mary went to the park", "a"), ("John went to the store", "b"), ("Alice went home", "a"),
            ("Bob went home", "b"), ("Sarah went to the beach", "c"), ("Tom went to school", "c")] * 2
    csv_path = tmp_path / "d.csv"
    csv_path.write_text("text,label\n" + "\n".join(f"{t},{y}" for t, y in rows), encoding="utf-8")
    jsonl_path = tmp_path / "d.jsonl"
    jsonl_path.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in rows), encoding="utf-8")
    a = drive(probe_job(lm_gpt2, csv_path, test_fraction=0.5))
    b = drive(probe_job(lm_gpt2, jsonl_path, test_fraction=0.5))
    np.testing.assert_array_equal(a.values, b.values)
    assert list(a.extras["classes"]) == ["a", "b", "c"]
    assert a.extras["confusion"].shape == (2, 3, 3) and a.extras["directions"].shape == (2, 3, 32)


def test_split_is_stratified_and_seeded():
    y = np.array([0] * 8 + [1] * 4)
    tr, te = stratified_split(y, 0.25, seed=3)
    assert sorted(np.r_[tr, te].tolist()) == list(range(12))
    assert (y[te] == 0).sum() == 2 and (y[te] == 1).sum() == 1
    tr2, te2 = stratified_split(y, 0.25, seed=3)
    np.testing.assert_array_equal(te, te2)


def test_bad_datasets_are_one_sentence(lm_gpt2, tmp_path):
    with pytest.raises(SpecError, match="only one label"):
        drive(probe_job(lm_gpt2, [("Mary went home", "x"), ("John went home", "x")]))
    with pytest.raises(SpecError, match="at least 2 per class"):
        drive(probe_job(lm_gpt2, [("Mary went home", "x"), ("John went home", "y"), ("Bob went home", "y")]))
    long_text = " ".join(["Mary"] * 1100)
    with pytest.raises(PromptError, match="context"):
        drive(probe_job(lm_gpt2, [(long_text, "x"), ("a", "x"), ("b", "y"), ("c", "y")]))
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nhello,1\n", encoding="utf-8")
    with pytest.raises(SpecError, match="no column 'text'"):
        drive(probe_job(lm_gpt2, bad))
    with pytest.raises(SpecError, match="cannot be pooled"):
        drive(probe_job(lm_gpt2, [("a b", "x"), ("c d", "y")] * 2, hook="attn.hook_z"))


def test_fit_works_under_inference_mode():
    """The window's worker runs jobs inside torch.inference_mode()."""
    import torch

    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 5))
    y = (x[:, 0] > 0).astype(int)
    with torch.inference_mode():
        m = fit_logistic(x, y, 2)
    np.testing.assert_allclose(m.coef, fit_logistic(x, y, 2).coef)
    assert m.converged
