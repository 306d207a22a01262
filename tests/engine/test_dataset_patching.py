"""Activation patching over a dataset (pairs batched with the cells) against single-pair sweeps, the contract's
normalisation, named positions across pairs of different lengths (against one plain forward pass per cell),
and metric expressions with per-pair division by zero."""
import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.capture import forward_logits, hooks, run_with_cache
from desktop_app.engine.dataset_patching import dataset_patching_job
from desktop_app.engine.datasets import dataset_from_list, tokenize_dataset
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, drive
from desktop_app.engine.metric_expr import MetricExpression
from desktop_app.engine.patching import activation_patching_job
from desktop_app.engine.prompts import PromptPair
from desktop_app.engine.templates import factual_pairs, ioi_pairs


def aligned_items(lm, n=4, seed=3):
    """IOI pairs (same template family, one token length) from the synthetic task."""
    items, length = [], None
    for e in demo_task.ioi_examples(80, seed=seed):
        k = len(lm.tokenize(e.clean).ids)
        if len(lm.tokenize(e.corrupted).ids) != k or (length is not None and k != length):
            continue
        length = k
        items.append(dict(clean=e.clean, corrupted=e.corrupted, answer=e.answer, wrong_answer=e.wrong))
        if len(items) == n:
            return items
    raise AssertionError("not enough aligned IOI examples")


def singles(lm, data, **kw):
    out = []
    for p in data.pairs:
        a = p.answer_ids[0] if len(p.answer_ids) == 1 else p.answer_ids
        w = p.wrong_ids[0] if len(p.wrong_ids) == 1 else p.wrong_ids
        pair = PromptPair(p.clean, p.corrupted, a, w)
        out.append(drive(activation_patching_job(lm, pair, **kw)))
    return out


@pytest.mark.parametrize("component,positions", [
    ("resid_pre", "each"), ("head_out", "all"), ("head_out", "each"), ("attn_out", "each"), ("mlp_out", "all"),
    ("resid_post", "each"), ("resid_mid", "each")])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_each_pair_equals_its_single_pair_sweep(tiny_lm, component, positions, direction):
    if component == "resid_mid" and tiny_lm.info.parallel_attn_mlp:
        pytest.skip("no resid_mid in a parallel-residual model")
    data = tokenize_dataset(tiny_lm, dataset_from_list(aligned_items(tiny_lm)))
    got = drive(dataset_patching_job(tiny_lm, data, component, positions, direction, "logit_diff", batch_size=5,
                                     pairs_per_block=3))
    ref = singles(tiny_lm, data, component=component, positions=positions, direction=direction, metric="logit_diff")
    per_pair = np.stack([r.values for r in ref])
    np.testing.assert_allclose(got.extras["values_per_pair"], per_pair, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.values, per_pair.mean(0), atol=1e-5, rtol=0)
    sem = per_pair.std(0, ddof=1) / np.sqrt(len(ref))
    np.testing.assert_allclose(got.extras["sem"], sem, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.extras["clean_metric"], [r.clean_metric for r in ref], atol=1e-5)
    assert got.dims == ref[0].dims and got.tokens_clean.shape == (len(ref), len(data.pairs[0].clean.ids))


def test_normalised_metric_is_the_contract_formula(lm_ioi):
    data = tokenize_dataset(lm_ioi, dataset_from_list(aligned_items(lm_ioi, n=5)))
    got = drive(dataset_patching_job(lm_ioi, data, "resid_pre", "each", "denoise", "logit_diff_recovered"))
    raw = drive(dataset_patching_job(lm_ioi, data, "resid_pre", "each", "denoise", "logit_diff"))
    ld_patched = raw.extras["values_per_pair"]
    ld_clean, ld_corr = raw.extras["clean_metric"], raw.extras["corrupted_metric"]
    formula = (ld_patched.mean(0) - ld_corr.mean()) / (ld_clean.mean() - ld_corr.mean())
    np.testing.assert_allclose(got.values, formula, atol=1e-5)
    np.testing.assert_allclose(got.extras["values_per_pair"].mean(0), got.values, atol=1e-5)
    assert abs(got.clean_metric - 1) < 1e-5 and abs(got.corrupted_metric) < 1e-5
    np.testing.assert_allclose(got.extras["clean_logit_diff"], ld_clean, atol=1e-6)
    # known structure: at layer 0 a patch of every position gives the clean run: exactly 1 on average
    full = drive(dataset_patching_job(lm_ioi, data, "resid_pre", "all", "denoise", "logit_diff_recovered"))
    assert abs(full.values[0] - 1) < 1e-5


def test_expression_metric_and_answer_lists_equal_single_sweeps(lm_gpt2):
    items = aligned_items(lm_gpt2, n=3)
    items[1] = {**items[1], "answer": [items[1]["answer"], " Alice" if items[1]["answer"] != " Alice" else " Bob"]}
    data = tokenize_dataset(lm_gpt2, dataset_from_list(items))
    expr = MetricExpression("logprob(answer) - 0.5 * logit(wrong)")
    got = drive(dataset_patching_job(lm_gpt2, data, "resid_pre", "each", "denoise", expr))
    ref = singles(lm_gpt2, data, component="resid_pre", positions="each", direction="denoise",
                  metric=expr.bind(lm_gpt2.single_token_id))
    np.testing.assert_allclose(got.extras["values_per_pair"], np.stack([r.values for r in ref]), atol=1e-5)
    # by hand, for the unpatched corrupted run of the pair with two answers
    p = data.pairs[1]
    lp = torch.log_softmax(forward_logits(lm_gpt2, torch.tensor([p.corrupted.ids]))[0, -1].float(), -1)
    logits = forward_logits(lm_gpt2, torch.tensor([p.corrupted.ids]))[0, -1].float()
    hand = float(torch.logsumexp(lp[list(p.answer_ids)], 0) - 0.5 * logits[p.wrong_ids[0]])
    assert abs(got.extras["corrupted_metric"][1] - hand) < 1e-5


def test_division_by_zero_is_reported_per_pair(lm_gpt2):
    items = aligned_items(lm_gpt2, n=3)
    data = tokenize_dataset(lm_gpt2, dataset_from_list(items))
    # zero exactly for the pairs whose answer is pair 1's answer token: the other pairs are kept
    token = items[1]["answer"]
    tid = lm_gpt2.single_token_id(token)
    has = [i for i, p in enumerate(data.pairs) if tid in p.answer_ids]
    assert 1 in has and len(has) < len(items) or pytest.skip("every pair has the same answer")
    expr = MetricExpression(f"logit(answer) / (logit(answer) - logit('{token}'))")
    got = drive(dataset_patching_job(lm_gpt2, data, "resid_pre", "each", "denoise", expr, pairs_per_block=2))
    v = got.extras["values_per_pair"]
    for i in range(len(items)):
        assert np.isnan(v[i]).all() == (i in has) and (np.isfinite(v[i]).all() or i in has)
    assert "divides by zero for pairs " + ", ".join(map(str, has)) in got.message
    assert got.message.count("divides by zero") == 1
    assert np.isfinite(got.values).all()


SUBJECT_TABLE = [("the store", "Mary"), ("the old red park", "John"), ("a school", "Alice"),
                 ("the big quiet beach", "Bob"), ("the office", "Sarah")]


def test_named_positions_align_pairs_of_different_lengths(lm_llama):
    data = tokenize_dataset(lm_llama, factual_pairs(4, SUBJECT_TABLE, seed=0, template="Then {SUBJECT} was seen by"))
    lengths = {(len(p.clean.ids), len(p.corrupted.ids)) for p in data.pairs}
    assert len(lengths) > 1 and any(a != b for a, b in lengths)
    with pytest.raises(SpecError, match="use positions 'named'"):
        drive(dataset_patching_job(lm_llama, data, "resid_pre", "each"))
    with pytest.raises(PromptError, match="prompts to line up"):
        drive(dataset_patching_job(lm_llama, data, "resid_pre", "all"))
    with pytest.raises(SpecError, match="positions must be one of"):
        drive(dataset_patching_job(lm_llama, data, "resid_pre", "every"))
    got = drive(dataset_patching_job(lm_llama, data, "resid_pre", "named", "denoise", "logit_diff", batch_size=3))
    assert got.labels["position"] == ["SUBJECT", "END"]
    n = lm_llama.info.n_layers
    for i, p in enumerate(data.pairs):  # one plain forward pass per cell
        names = [hook_name(L, "resid_pre") for L in range(n)]
        _, clean = run_with_cache(lm_llama, [p.clean.ids], names)
        for L in range(n):
            for j, role in enumerate(["SUBJECT", "END"]):
                c, k = p.positions[role]

                def patch(act, L=L, c=c, k=k):
                    act = act.clone()
                    act[:, k] = clean[names[L]][:, c].to(act.dtype)
                    return act
                with hooks(lm_llama, write={names[L]: patch}):
                    logits = forward_logits(lm_llama, torch.tensor([p.corrupted.ids]))[0, -1]
                want = float(logits[p.answer_ids[0]] - logits[p.wrong_ids[0]])
                assert abs(got.extras["values_per_pair"][i, L, j] - want) < 1e-4


def test_ioi_template_named_heads(lm_gpt2):
    data = tokenize_dataset(lm_gpt2, ioi_pairs(5, seed=0))
    got = drive(dataset_patching_job(lm_gpt2, data, "head_out", "named", "denoise", "logit_diff"))
    assert got.dims == ["layer", "position", "head"] and got.labels["position"] == ["IO", "S1", "S2", "END"]
    ref = singles(lm_gpt2, data, component="head_out", positions="each", direction="denoise", metric="logit_diff")
    for i, (p, r) in enumerate(zip(data.pairs, ref)):
        cols = [p.positions[name][0] for name in ("IO", "S1", "S2", "END")]
        np.testing.assert_allclose(got.extras["values_per_pair"][i], r.values[:, cols], atol=1e-5)


def test_cancel_keeps_a_partial_result(lm_gpt2):
    data = tokenize_dataset(lm_gpt2, dataset_from_list(aligned_items(lm_gpt2)))
    cancel = CancelToken()
    job = dataset_patching_job(lm_gpt2, data, "resid_pre", "each", metric="logit_diff", cancel=cancel,
                               batch_size=2, pairs_per_block=2)
    seen = []

    def on(event):
        seen.append(event)
        if isinstance(event, Partial):
            cancel.cancel()
    r = drive(job, on)
    assert r.status == "partial" and np.isfinite(r.extras["values_per_pair"][:2]).all()
    assert np.isnan(r.extras["values_per_pair"][2:]).all()
