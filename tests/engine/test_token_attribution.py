"""Token attribution against references written here with plain `inputs_embeds` forward passes: autograd one
input at a time, a step-by-step integral, brute-force Shapley values over every permutation, a window loop,
and Captum's LayerIntegratedGradients when Captum is installed."""
import itertools
import math

import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import CancelToken, Partial, drive
from desktop_app.engine.token_attribution import (integration_rule, lime_weights, shapley_from_table,
                                                  token_attribution_job, weighted_ridge)

PROMPT = "When Mary and John went to the store, John gave a drink to"
SHORT = "Mary and John went to"


def _setup(lm, text=PROMPT):
    tokens = lm.tokenize(text)
    return tokens, lm.single_token_id(" Mary"), lm.single_token_id(" John")


def _embeds(lm, ids):
    with torch.no_grad():
        return lm.adapter.embed(torch.tensor([ids]))[0].double()


def _f(lm, embeds, a, w):
    """logit_diff at the last position for inputs_embeds [rows, pos, d] (float32 model, any grad mode)."""
    logits = lm.model(inputs_embeds=embeds.float()).logits[:, -1].double()
    return logits[:, a] - logits[:, w]


def _grad(lm, e, a, w):
    e = e.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_f(lm, e[None], a, w).sum(), e)
    return g


def test_saliency_and_grad_x_input_equal_autograd(tiny_lm):
    tokens, a, w = _setup(tiny_lm)
    e = _embeds(tiny_lm, tokens.ids)
    g = _grad(tiny_lm, e, a, w)
    sal = drive(token_attribution_job(tiny_lm, tokens, a, w, method="saliency"))
    gxi = drive(token_attribution_job(tiny_lm, tokens, a, w, method="grad_x_input"))
    np.testing.assert_allclose(sal.values, g.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gxi.values, (g * e).sum(-1).numpy(), rtol=1e-4, atol=1e-5)
    assert sal.dims == ["position"] and sal.labels["position"] == tokens.labels()


@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_trapezoid", "riemann_middle"])
def test_integrated_gradients_equals_a_step_by_step_integral_and_is_complete(tiny_lm, integration):
    tokens, a, w = _setup(tiny_lm, SHORT)
    steps = 20
    res = drive(token_attribution_job(tiny_lm, tokens, a, w, method="integrated_gradients", baseline="zero",
                                      steps=steps, integration=integration))
    e = _embeds(tiny_lm, tokens.ids)
    alphas, weights = integration_rule(integration, steps)
    acc = torch.zeros_like(e)
    for alpha, weight in zip(alphas, weights):  # one backward pass per step: the slow, obvious way
        acc += weight * _grad(tiny_lm, alpha * e, a, w)
    ref = (e * acc).sum(-1).numpy()
    np.testing.assert_allclose(res.values, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        gap = _f(tiny_lm, e[None], a, w)[0] - _f(tiny_lm, torch.zeros_like(e)[None], a, w)[0]
    delta = res.extras["convergence_delta"][0]
    assert delta == pytest.approx(ref.sum() - float(gap), rel=1e-5, abs=1e-4)


def test_integrated_gradients_is_complete_within_the_reported_gap(tiny_lm):
    # from a token baseline (the zero vector sits where RMSNorm is steepest, so 50 steps do not converge there;
    # the reported gap shows it)
    tokens, a, w = _setup(tiny_lm, SHORT)
    res = drive(token_attribution_job(tiny_lm, tokens, a, w, method="integrated_gradients", baseline=" the",
                                      steps=50))
    gap = res.extras["deletion_curve"][0] - res.extras["baseline_target"][0]
    assert res.values.sum() - gap == pytest.approx(res.extras["convergence_delta"][0], abs=1e-4)
    assert abs(res.extras["convergence_delta"][0]) < 1e-2 * max(1.0, abs(gap))


def test_integrated_gradients_batches_its_steps(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2)
    calls = []
    handle = lm_gpt2.adapter.blocks[0].register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0] if args else kwargs["hidden_states"].shape[0]),
                                                                   with_kwargs=True)
    try:
        drive(token_attribution_job(lm_gpt2, tokens, a, w, method="integrated_gradients", steps=50, batch_size=64))
    finally:
        handle.remove()
    # 50 steps in two batched passes of 32 and 18 rows, then f(x) and f(baseline), then the deletion curve
    assert calls == [32, 18, 2, len(tokens.ids) + 1]


def test_integrated_gradients_equals_captum_layer_integrated_gradients(lm_gpt2):
    captum_attr = pytest.importorskip("captum.attr")
    tokens, a, w = _setup(lm_gpt2)
    base_id = lm_gpt2.single_token_id(" the") if lm_gpt2.is_single_token(" the") else lm_gpt2.single_token_id(" to")
    base_text = lm_gpt2.tokens_of_ids([base_id]).strings[0]
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="integrated_gradients", baseline=base_text,
                                      steps=50, integration="gausslegendre"))

    def forward(ids):
        logits = lm_gpt2.model(input_ids=ids).logits[:, -1]
        return logits[:, a] - logits[:, w]
    lig = captum_attr.LayerIntegratedGradients(forward, lm_gpt2.adapter.embed)
    ids = torch.tensor([tokens.ids])
    with torch.enable_grad():
        attr, delta = lig.attribute(ids, baselines=torch.full_like(ids, base_id), n_steps=50,
                                    method="gausslegendre", return_convergence_delta=True)
    np.testing.assert_allclose(res.values, attr[0].sum(-1).detach().numpy(), rtol=1e-4, atol=1e-5)
    assert res.extras["convergence_delta"][0] == pytest.approx(float(delta[0]), abs=1e-4)


def test_occlusion_equals_a_window_loop(lm_llama):
    tokens, a, w = _setup(lm_llama, SHORT)
    res = drive(token_attribution_job(lm_llama, tokens, a, w, method="occlusion", baseline="zero", window=2))
    e = _embeds(lm_llama, tokens.ids)
    n = len(tokens.ids)
    with torch.no_grad():
        full = float(_f(lm_llama, e[None], a, w)[0])
        sums, counts = np.zeros(n), np.zeros(n)
        for s in range(n - 1):
            x = e.clone()
            x[s:s + 2] = 0
            drop = full - float(_f(lm_llama, x[None], a, w)[0])
            sums[s:s + 2] += drop
            counts[s:s + 2] += 1
    np.testing.assert_allclose(res.values, sums / counts, rtol=1e-4, atol=1e-5)


def _value_fn(lm, e, base, a, w):
    def v(coalition):
        x = base[None].repeat(e.shape[0], 1).clone()
        for i in coalition:
            x[i] = e[i]
        with torch.no_grad():
            return float(_f(lm, x[None], a, w)[0])
    return v


def test_exact_shapley_equals_brute_force_over_permutations_on_six_tokens(lm_gpt2):
    tokens = lm_gpt2.tokenize(" Mary and John went to the", prepend_bos=False)
    a, w = lm_gpt2.single_token_id(" Mary"), lm_gpt2.single_token_id(" John")
    assert len(tokens.ids) == 6
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="shap", baseline="zero"))
    e = _embeds(lm_gpt2, tokens.ids)
    v = _value_fn(lm_gpt2, e, torch.zeros(e.shape[1], dtype=e.dtype), a, w)
    cache = {}
    phi = np.zeros(6)
    for perm in itertools.permutations(range(6)):
        for j, player in enumerate(perm):
            before = frozenset(perm[:j])
            for s in (before, before | {player}):
                if s not in cache:
                    cache[s] = v(s)
            phi[player] += cache[before | {player}] - cache[before]
    phi /= math.factorial(6)
    np.testing.assert_allclose(res.values, phi, rtol=1e-4, atol=1e-5)
    assert res.values.sum() == pytest.approx(cache[frozenset(range(6))] - cache[frozenset()], abs=1e-4)  # efficiency
    assert res.extras["shap_exact"][0] == 1


def test_shapley_table_formula_on_a_known_game():
    # v(S) = |S|^2 on 3 players: symmetric, so each gets v(N) / 3 = 3
    table = np.array([bin(m).count("1") ** 2 for m in range(8)], dtype=float)
    np.testing.assert_allclose(shapley_from_table(table, 3), [3.0, 3.0, 3.0])


def test_sampled_shapley_is_efficient_and_reproducible(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2)
    assert len(tokens.ids) > 12
    one = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="shap", baseline="zero", samples=60, seed=3))
    two = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="shap", baseline="zero", samples=60, seed=3))
    np.testing.assert_array_equal(one.values, two.values)
    e = _embeds(lm_gpt2, tokens.ids)
    v = _value_fn(lm_gpt2, e, torch.zeros(e.shape[1], dtype=e.dtype), a, w)
    assert one.values.sum() == pytest.approx(v(range(len(tokens.ids))) - v([]), abs=1e-4)
    assert one.extras["shap_exact"][0] == 0 and one.extras["shap_permutations"][0] == 60 // len(tokens.ids)


def test_weighted_ridge_equals_an_augmented_least_squares():
    rng = np.random.default_rng(0)
    x, y, wts = rng.random((40, 5)), rng.random(40), rng.random(40) + 0.1
    # rows scaled by sqrt(weight), an unpenalised intercept column, and sqrt(alpha) I rows for the penalty
    aug_x = np.vstack([np.hstack([x, np.ones((40, 1))]) * np.sqrt(wts)[:, None],
                       np.hstack([np.sqrt(2.0) * np.eye(5), np.zeros((5, 1))])])
    aug_y = np.concatenate([y * np.sqrt(wts), np.zeros(5)])
    ref = np.linalg.lstsq(aug_x, aug_y, rcond=None)[0][:5]
    np.testing.assert_allclose(weighted_ridge(x, y, wts, 2.0), ref, atol=1e-10)
    assert lime_weights(np.ones((1, 4), dtype=bool))[0] == pytest.approx(1.0)


def test_lime_is_reproducible_and_recovers_a_dominant_token(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2, SHORT)
    one = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="lime", baseline="zero", samples=128, seed=1))
    two = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="lime", baseline="zero", samples=128, seed=1))
    np.testing.assert_array_equal(one.values, two.values)
    assert np.isfinite(one.values).all() and one.status == "complete"


def test_deletion_curve_is_the_target_after_removing_the_top_tokens(lm_llama):
    tokens, a, w = _setup(lm_llama, SHORT)
    res = drive(token_attribution_job(lm_llama, tokens, a, w, method="grad_x_input", baseline="zero"))
    e = _embeds(lm_llama, tokens.ids)
    order = np.argsort(-res.values, kind="stable")
    np.testing.assert_array_equal(res.extras["deletion_order"], order)
    for k in (0, 1, 3):
        x = e.clone()
        x[torch.as_tensor(order[:k], dtype=torch.long)] = 0
        with torch.no_grad():
            assert res.extras["deletion_curve"][k] == pytest.approx(float(_f(lm_llama, x[None], a, w)[0]), abs=1e-4)
    assert res.extras["sanity_delta"][0] == pytest.approx(res.extras["deletion_curve"][0] - res.extras["deletion_curve"][1])


def test_sanity_rule_reports_a_top_token_that_does_not_move_the_target(lm_gpt2):
    tokens = lm_gpt2.tokenize(" Mary Mary Mary", prepend_bos=False)
    a, w = lm_gpt2.single_token_id(" Mary"), lm_gpt2.single_token_id(" John")
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="occlusion", baseline=" Mary"))
    assert "sanity check failed" in res.message


def test_pad_baseline_names_the_stand_in_token_and_bad_input_is_refused(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2, SHORT)
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="saliency", baseline="pad"))
    if lm_gpt2.tokenizer.pad_token_id is None:
        assert "no pad token" in res.message
    for bad in (dict(method="deeplift"), dict(target="kl"), dict(baseline=" Mary John"), dict(steps=0),
                dict(integration="simpson"), dict(method="shap", samples=1), dict(window=99)):
        with pytest.raises(Exception) as err:
            drive(token_attribution_job(lm_gpt2, tokens, a, w, **{"method": "integrated_gradients", **bad}))
        assert err.type.__name__ in ("SpecError", "PromptError")
    with pytest.raises(SpecError):
        drive(token_attribution_job(lm_gpt2, tokens, a, a, target="logit_diff"))


def test_cancel_keeps_the_finished_occlusion_windows(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2)
    cancel = CancelToken()

    def on_event(ev):
        if isinstance(ev, Partial):
            cancel.cancel()
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="occlusion", batch_size=4, cancel=cancel), on_event)
    assert res.status == "partial"
    assert np.isfinite(res.values[:3]).all() and np.isnan(res.values[-1])


def test_real_model_integrated_gradients_is_complete(stories_dir):
    from desktop_app.engine.loading import load_model

    lm = load_model(stories_dir, dtype="float32", device="cpu")
    tokens = lm.tokenize("Once upon a time, there was a little girl named")
    a, w = lm.single_token_id(" Lily"), lm.single_token_id(" the")
    res = drive(token_attribution_job(lm, tokens, a, w, method="integrated_gradients", steps=64))
    gap = res.extras["deletion_curve"][0] - res.extras["baseline_target"][0]
    assert abs(res.extras["convergence_delta"][0]) < 0.02 * max(1.0, abs(gap))


def test_lime_cancel_keeps_the_fit_on_the_samples_so_far(lm_gpt2):
    tokens, a, w = _setup(lm_gpt2, SHORT)
    cancel = CancelToken()

    def on_event(ev):
        if isinstance(ev, Partial):
            cancel.cancel()
    res = drive(token_attribution_job(lm_gpt2, tokens, a, w, method="lime", samples=64, batch_size=8,
                                      cancel=cancel), on_event)
    assert res.status == "partial" and np.isfinite(res.values).all()
    assert "deletion_curve" not in res.extras
