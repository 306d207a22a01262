"""Attribution patching, ablation, causal tracing and SAE features over a dataset: each equals the mean of its
single-pair results (to 1e-5), with per-pair values, the standard error and per-pair reference metrics."""
import numpy as np
import pytest
import torch

from desktop_app.engine.ablation import ablation_job
from desktop_app.engine.attribution import attribution_patching_job
from desktop_app.engine.dataset_runner import (dataset_ablation_job, dataset_attribution_job,
                                               dataset_sae_features_job, dataset_tracing_job, single_pair)
from desktop_app.engine.datasets import dataset_from_list, tokenize_dataset
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.metric_expr import MetricExpression
from desktop_app.engine.sae.formats import save_saelens
from desktop_app.engine.sae.jobs import sae_features_job
from desktop_app.engine.sae.model import SAE, SAEConfig
from desktop_app.engine.templates import factual_pairs, ioi_pairs
from desktop_app.engine.tracing import causal_tracing_job

from test_dataset_patching import SUBJECT_TABLE, aligned_items


def check_mean(got, singles, key=lambda r: r.values):
    per_pair = np.stack([key(r) for r in singles]).astype(np.float64)
    np.testing.assert_allclose(got.extras["values_per_pair"], per_pair, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.values, per_pair.mean(0), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got.extras["sem"], per_pair.std(0, ddof=1) / np.sqrt(len(singles)), atol=1e-5)
    assert got.extras["clean_metric"].shape == (len(singles),)


@pytest.fixture(scope="module")
def data(lm_gpt2):
    return tokenize_dataset(lm_gpt2, dataset_from_list(aligned_items(lm_gpt2, n=3)))


@pytest.mark.parametrize("component,positions", [("resid_pre", "each"), ("head_out", "all")])
def test_attribution_over_a_dataset(lm_gpt2, data, component, positions):
    got = drive(dataset_attribution_job(lm_gpt2, data, component, positions, "denoise", "logit_diff"))
    ref = [drive(attribution_patching_job(lm_gpt2, single_pair(p), component, positions, "denoise", "logit_diff"))
           for p in data.pairs]
    check_mean(got, ref)
    np.testing.assert_allclose(got.extras["clean_metric"], [r.clean_metric for r in ref], atol=1e-5)


def test_attribution_normalised_is_the_contract_formula(lm_gpt2, data):
    got = drive(dataset_attribution_job(lm_gpt2, data, "resid_pre", "each", "denoise", "logit_diff_recovered"))
    raw = drive(dataset_attribution_job(lm_gpt2, data, "resid_pre", "each", "denoise", "logit_diff"))
    c, k = raw.extras["clean_metric"].mean(), raw.extras["corrupted_metric"].mean()
    np.testing.assert_allclose(got.values, (raw.extras["values_per_pair"].mean(0) - k) / (c - k), atol=1e-5)


def test_ablation_over_a_dataset_with_an_expression(lm_gpt2, data):
    expr = MetricExpression("prob(answer) - prob(wrong)")
    got = drive(dataset_ablation_job(lm_gpt2, data, "head_out", "zero", "all", expr))
    bound = expr.bind(lm_gpt2.single_token_id)
    ref = [drive(ablation_job(lm_gpt2, single_pair(p), "head_out", "zero", "all", bound)) for p in data.pairs]
    check_mean(got, ref)
    assert got.params["metric"] == expr.text


def test_causal_tracing_over_a_dataset_with_a_named_subject(lm_llama):
    data = tokenize_dataset(lm_llama, factual_pairs(3, SUBJECT_TABLE, seed=1, template="Then {SUBJECT} was seen by"))
    got = drive(dataset_tracing_job(lm_llama, data, "SUBJECT", samples=3, positions="named"))
    assert got.labels["position"] == ["SUBJECT", "END"]
    for i, p in enumerate(data.pairs):
        r = drive(causal_tracing_job(lm_llama, single_pair(p), data.pairs[i].span_texts["SUBJECT"], samples=3))
        cols = [p.positions["SUBJECT"][0], p.positions["END"][0]]
        np.testing.assert_allclose(got.extras["values_per_pair"][i], r.values[:, cols], atol=1e-5)
        assert abs(got.extras["clean_metric"][i] - r.clean_metric) < 1e-6
    with pytest.raises(SpecError, match="same token length"):
        drive(dataset_tracing_job(lm_llama, data, "SUBJECT", samples=3, positions="each"))


def test_sae_features_over_a_dataset(lm_gpt2, data, tmp_path):
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=32, d_sae=48, hook_name="blocks.1.hook_resid_pre"))
    with torch.no_grad():
        for prm in sae.parameters():
            prm.copy_(torch.randn(prm.shape, generator=g) * 0.3)
    folder = save_saelens(sae, tmp_path / "sae")
    got = drive(dataset_sae_features_job(lm_gpt2, data, folder, top_k=0))
    ref = [drive(sae_features_job(lm_gpt2, p.clean.ids, folder, top_k=0)) for p in data.pairs]
    check_mean(got, ref)
    top = drive(dataset_sae_features_job(lm_gpt2, data, folder, top_k=2))
    feats = [int(f) for f in top.labels["feature"]]
    mean = np.stack([r.values for r in ref]).mean(0)
    want = sorted({int(i) for row in mean for i, v in zip(np.argsort(-row)[:2], np.sort(row)[::-1][:2]) if v > 0})
    assert feats == want
    np.testing.assert_allclose(top.values, mean[:, feats], atol=1e-5)


def test_answer_lists_and_ioi_named_positions_for_ablation(lm_gpt2):
    data = tokenize_dataset(lm_gpt2, ioi_pairs(3, seed=2))
    got = drive(dataset_ablation_job(lm_gpt2, data, "resid_pre", "zero", "named", "logit_diff"))
    assert got.dims == ["layer", "position"] and got.labels["position"] == ["IO", "S1", "S2", "END"]
    for i, p in enumerate(data.pairs):
        r = drive(ablation_job(lm_gpt2, single_pair(p), "resid_pre", "zero", "each", "logit_diff"))
        cols = [p.positions[n][0] for n in ("IO", "S1", "S2", "END")]
        np.testing.assert_allclose(got.extras["values_per_pair"][i], r.values[:, cols], atol=1e-5)


def test_a_metric_reading_the_wrong_answer_is_refused_on_pairs_without_one(lm_gpt2):
    from desktop_app.engine.dataset_patching import dataset_patching_job

    items = [dict(item, wrong_answer="") for item in aligned_items(lm_gpt2, n=2)]
    bare = tokenize_dataset(lm_gpt2, dataset_from_list(items), need_wrong=False)
    for job in (lambda m: dataset_patching_job(lm_gpt2, bare, "resid_pre", "each", metric=m),
                lambda m: dataset_ablation_job(lm_gpt2, bare, "head_out", "zero", "all", m)):
        for metric in ("logit_diff", "logit_diff_recovered", MetricExpression("logit(answer) - logit(wrong)")):
            with pytest.raises(SpecError, match="reads the wrong answer, but pair 0 has none"):
                drive(job(metric))
        assert np.isfinite(drive(job(MetricExpression("logprob(answer)"))).values).all()
