"""Causal tracing against a naive reference: one plain forward pass of the noisy copies per cell, bare torch hooks."""

import numpy as np
import pytest
import torch

from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.prompts import prepare_pair
from desktop_app.engine.tracing import causal_tracing_job, prepare_trace, restored_probs, subject_positions

CLEAN = "When Mary and John went to the store, John gave a drink to"
SUBJECT = "Mary and John"


@pytest.fixture(scope="module")
def models(gpt2_dir, llama_dir, neox_dir):
    return {k: load_model(d, dtype="float32", device="cpu") for k, d in
            (("gpt2", gpt2_dir), ("llama", llama_dir), ("neox", neox_dir))}


def _pair(lm):
    return prepare_pair(lm, CLEAN, CLEAN, " Mary", " John", need_corrupted=False)


def _subject_pos(lm):
    strings = lm.tokenize(CLEAN).strings
    for i in range(len(strings)):
        for j in range(i + 1, len(strings) + 1):
            if "".join(strings[i:j]).strip() == SUBJECT:
                return list(range(i, j))
    raise AssertionError("subject tokens not found")


def _forward_probs(lm, ids, answer, samples, subj, delta, restore=()):
    """Answer probability per noisy copy; restore: [(module, position, clean output [pos, d])]."""
    handles = []

    def noise_hook(_m, _i, out):
        out = out.clone()
        out[:, subj] += delta
        return out
    handles.append(lm.adapter.embed.register_forward_hook(noise_hook))
    for module, t, clean in restore:
        def put(_m, _i, out, t=t, clean=clean):
            h = out[0] if isinstance(out, tuple) else out
            h = h.clone()
            h[:, t] = clean[t]
            return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
        handles.append(module.register_forward_hook(put))
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([ids] * samples)).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return torch.softmax(logits, -1)[:, answer]


def _clean_outputs(lm, ids, modules):
    seen, handles = {}, []
    for key, m in modules.items():
        def keep(_m, _i, out, key=key):
            seen[key] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()
        handles.append(m.register_forward_hook(keep))
    try:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    return seen


def _reference(lm, pair, subj, component, window, noise, samples, seed, positions):
    a, n = lm.adapter, lm.info.n_layers
    ids = pair.clean.ids
    emb = _clean_outputs(lm, ids, {"e": a.embed})["e"]
    std = emb[subj].std()
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn((samples, len(subj), emb.shape[-1]), generator=g) * noise * std
    modules = {L: {"resid_post": a.blocks[L], "mlp_out": a.mlp(L), "attn_out": a.attn(L)}[component]
               for L in range(n)}
    clean = _clean_outputs(lm, ids, modules)
    ref = {}
    for L in range(n):
        # ROME trace_important_window: range(max(0, L - window // 2), min(n, L - (-window // 2)))
        layers = [L] if component == "resid_post" else range(max(0, L - window // 2), min(n, L + (window + 1) // 2))
        for t in positions:
            restore = [(modules[k], t, clean[k]) for k in layers]
            ref[L, t] = float(_forward_probs(lm, ids, pair.answer_id, samples, subj, delta, restore).mean())
    corrupted = float(_forward_probs(lm, ids, pair.answer_id, samples, subj, delta).mean())
    return ref, corrupted


@pytest.mark.parametrize("model,component,window", [
    ("gpt2", "resid_post", 10), ("llama", "mlp_out", 1), ("neox", "attn_out", 3), ("gpt2", "mlp_out", 2),
    ("llama", "resid_post", 10), ("neox", "mlp_out", 10)])
def test_trace_equals_naive_reference(models, model, component, window):
    lm = models[model]
    pair = _pair(lm)
    subj = _subject_pos(lm)
    res = drive(causal_tracing_job(lm, pair, SUBJECT, noise=3.0, samples=3, component=component, window=window,
                                   seed=5, batch_size=7))
    assert res.dims == ["layer", "position"] and res.values.shape == (lm.info.n_layers, pair.n_pos)
    assert list(res.extras["subject_positions"]) == subj
    positions = sorted({0, *subj, subj[-1] + 1, pair.n_pos - 1})
    ref, corrupted = _reference(lm, pair, subj, component, window, 3.0, 3, 5, positions)
    for (L, t), v in ref.items():
        assert res.values[L, t] == pytest.approx(v, abs=1e-5), (L, t)
    assert np.isfinite(res.values).all()
    assert res.corrupted_metric == pytest.approx(corrupted, abs=1e-5)
    with torch.no_grad():
        clean_logits = lm.model(input_ids=torch.tensor([pair.clean.ids])).logits[0, -1]
    assert res.clean_metric == pytest.approx(float(torch.softmax(clean_logits, -1)[pair.answer_id]), abs=1e-6)


def test_seeded_and_reproducible(models):
    lm = models["llama"]
    pair = _pair(lm)
    run = lambda seed, bs: drive(causal_tracing_job(lm, pair, SUBJECT, samples=4, seed=seed, batch_size=bs))
    first = run(1, 8)
    np.testing.assert_array_equal(first.values, run(1, 8).values)
    np.testing.assert_allclose(first.values, run(1, 64).values, atol=1e-6)  # batching does not change a cell
    assert not np.allclose(first.values, run(2, 8).values)


def test_known_structure(models):
    lm = models["gpt2"]
    pair = _pair(lm)
    subj = _subject_pos(lm)
    res = drive(causal_tracing_job(lm, pair, SUBJECT, samples=3, component="resid_post", seed=0))
    # positions before the subject never see the noise: restoring them changes nothing
    np.testing.assert_allclose(res.values[:, :subj[0]], res.corrupted_metric, atol=1e-6)
    # restoring every position of the residual stream at any layer is the clean run
    with torch.inference_mode():
        state = prepare_trace(lm, pair.clean.ids, pair.answer_id, subj, "resid_post", 3.0, 3, 0)
        for L in range(lm.info.n_layers):
            p = restored_probs(lm, state, "resid_post", 10, [(L, tuple(range(pair.n_pos)))])
            assert float(p[0]) == pytest.approx(res.clean_metric, abs=1e-5)
    # no noise: every cell is the clean probability
    quiet = drive(causal_tracing_job(lm, pair, SUBJECT, noise=0.0, samples=2, component="mlp_out", window=1))
    np.testing.assert_allclose(quiet.values, quiet.clean_metric, atol=1e-6)


def test_subject_lookup_and_errors(models):
    lm = models["neox"]
    tokens = lm.tokenize(CLEAN)
    assert subject_positions(tokens, " John") == [subject_positions(tokens, "John")[0]]  # first occurrence
    assert "".join(tokens.strings[i] for i in subject_positions(tokens, "ohn went")).strip() == "John went"
    with pytest.raises(PromptError, match=r"'Alice'.*tokens: .*·Mary"):
        drive(causal_tracing_job(lm, _pair(lm), "Alice"))
    with pytest.raises(SpecError):
        drive(causal_tracing_job(lm, _pair(lm), SUBJECT, component="resid_pre"))
