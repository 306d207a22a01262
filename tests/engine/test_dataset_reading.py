"""Direct logit attribution, the logit lens and token attribution over a dataset: each equals the mean of its
single-pair results (to 1e-5), and per pair DLA's parts still sum to that pair's own logit difference (a plain
forward pass here)."""
import numpy as np
import pytest
import torch

from desktop_app.engine.dataset_reading import dataset_dla_job, dataset_logit_lens_job, dataset_token_attribution_job
from desktop_app.engine.datasets import dataset_from_list, tokenize_dataset
from desktop_app.engine.dla import direct_logit_attribution_job
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.lenses import logit_lens_job
from desktop_app.engine.templates import ioi_pairs
from desktop_app.engine.token_attribution import token_attribution_job

from test_dataset_patching import aligned_items
from test_dataset_runner import check_mean


@pytest.fixture(scope="module")
def data(lm_gpt2):
    return tokenize_dataset(lm_gpt2, dataset_from_list(aligned_items(lm_gpt2, n=3)))


@pytest.mark.parametrize("granularity", ["heads", "layers"])
def test_dla_over_a_dataset_is_the_mean_and_each_pair_sums_to_its_logit_difference(lm_gpt2, data, granularity):
    got = drive(dataset_dla_job(lm_gpt2, data, granularity))
    assert got.status == "complete", got.message
    singles = [drive(direct_logit_attribution_job(lm_gpt2, p.clean, p.answer_ids[0], p.wrong_ids[0],
                                                  granularity=granularity)) for p in data.pairs]
    check_mean(got, singles)
    per_pair = got.extras["values_per_pair"]
    for i, p in enumerate(data.pairs):
        with torch.no_grad():
            logits = lm_gpt2.model(input_ids=torch.tensor([p.clean.ids])).logits[0, -1].double()
        total = float(logits[p.answer_ids[0]] - logits[p.wrong_ids[0]])
        other = got.extras["mlp_layers_per_pair"][i].sum() if granularity == "heads" else 0.0
        parts = per_pair[i].sum() + other + got.extras["embed_per_pair"][i] + got.extras["bias_per_pair"][i]
        assert parts == pytest.approx(total, abs=1e-4 * max(1.0, abs(total)))
        assert got.extras["logit_diff_per_pair"][i] == pytest.approx(total, abs=1e-4 * max(1.0, abs(total)))
    # the mean parts add up to the mean logit difference
    other = got.extras["mlp_layers"].sum() if granularity == "heads" else 0.0
    mean_parts = got.values.sum() + other + got.extras["embed"][0] + got.extras["bias"][0]
    assert mean_parts == pytest.approx(float(got.extras["logit_diff"][0]), abs=1e-4)


def test_logit_lens_over_a_dataset_is_the_mean_per_position(lm_gpt2, data):
    got = drive(dataset_logit_lens_job(lm_gpt2, data, target="answer", k=3))
    singles = [drive(logit_lens_job(lm_gpt2, p.clean, target="answer", answer_id=p.answer_ids[0], k=3))
               for p in data.pairs]
    check_mean(got, singles)
    assert got.dims == ["layer", "position"] and len(got.labels["position"]) == got.values.shape[1]


def test_logit_lens_over_named_positions_and_refusal_without_them(lm_gpt2):
    ioi = tokenize_dataset(lm_gpt2, ioi_pairs(3, seed=2))
    got = drive(dataset_logit_lens_job(lm_gpt2, ioi, target="prediction"))
    assert got.labels["position"] == list(ioi.position_names)
    singles = [drive(logit_lens_job(lm_gpt2, p.clean, target="prediction")) for p in ioi.pairs]
    cols = [[p.positions[n][0] for n in ioi.position_names] for p in ioi.pairs]
    per_pair = np.stack([r.values[:, c] for r, c in zip(singles, cols)])
    np.testing.assert_allclose(got.extras["values_per_pair"], per_pair, atol=1e-5, rtol=0)
    mixed = tokenize_dataset(lm_gpt2, dataset_from_list([
        dict(clean="Mary went to", corrupted="John went to", answer=" the", wrong_answer=" a"),
        dict(clean="When Mary and John went to the store", corrupted="When Mary and John went to the park",
             answer=" the", wrong_answer=" a")]))
    with pytest.raises(SpecError, match="same token length"):
        drive(dataset_logit_lens_job(lm_gpt2, mixed))


@pytest.mark.parametrize("target", ["logit_diff", {"expression": "prob(answer) / prob(wrong)"}])
def test_token_attribution_over_a_dataset_is_the_mean(lm_gpt2, data, target):
    got = drive(dataset_token_attribution_job(lm_gpt2, data, "integrated_gradients", target, steps=8,
                                              baseline="zero"))
    singles = [drive(token_attribution_job(lm_gpt2, p.clean, p.answer_ids[0], p.wrong_ids[0],
                                           method="integrated_gradients", target=target, steps=8, baseline="zero"))
               for p in data.pairs]
    check_mean(got, singles)
    np.testing.assert_allclose(got.extras["convergence_delta_per_pair"][:, 0],
                               [r.extras["convergence_delta"][0] for r in singles], atol=1e-6)
    assert got.extras["deletion_curve_per_pair"].shape == (3, got.values.shape[0] + 1)


def test_refusals_over_datasets(lm_gpt2, data):
    with pytest.raises(SpecError, match="clean or corrupted"):
        drive(dataset_dla_job(lm_gpt2, data, prompt="Mary went to"))
    lists = tokenize_dataset(lm_gpt2, dataset_from_list([dict(aligned_items(lm_gpt2, n=1)[0],
                                                             answer=[" Mary", " John"])]))
    with pytest.raises(SpecError, match="one answer token per pair, but pair 0 gives 2"):
        drive(dataset_dla_job(lm_gpt2, lists))
