"""Metric expressions (contract 6.2) as the target of token attribution and TCAV, against references written
here: the built-in target's attributions, autograd of the expression written out in torch, completeness of
integrated gradients, and central finite differences along a direction."""
import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.token_attribution import token_attribution_job

SHORT = "Mary and John went to"


def _setup(lm, text=SHORT):
    return lm.tokenize(text), lm.single_token_id(" Mary"), lm.single_token_id(" John")


def _ratio(lm, embeds, a, w):
    """prob(answer) / prob(wrong) at the last position for inputs_embeds [rows, pos, d]."""
    probs = torch.softmax(lm.model(inputs_embeds=embeds.float()).logits[:, -1].double(), -1)
    return probs[:, a] / probs[:, w]


@pytest.mark.parametrize("method", ["saliency", "grad_x_input", "integrated_gradients", "occlusion"])
def test_logit_difference_expression_equals_the_built_in_target_exactly(tiny_lm, method):
    tokens, a, w = _setup(tiny_lm)
    builtin = drive(token_attribution_job(tiny_lm, tokens, a, w, method=method, steps=16))
    written = drive(token_attribution_job(tiny_lm, tokens, a, w, method=method, steps=16,
                                          target={"expression": "logit(answer) - logit(wrong)"}))
    np.testing.assert_array_equal(written.values, builtin.values)
    np.testing.assert_array_equal(written.extras["deletion_curve"], builtin.extras["deletion_curve"])
    assert written.params["target"] == "logit(answer) - logit(wrong)"


def test_nonlinear_expression_gradient_equals_autograd_and_ig_is_complete(tiny_lm):
    tokens, a, w = _setup(tiny_lm)
    expr = {"expression": "prob(answer) / prob(wrong)"}
    with torch.no_grad():
        e = tiny_lm.adapter.embed(torch.tensor([tokens.ids]))[0].double()
    leaf = e.clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(_ratio(tiny_lm, leaf[None], a, w).sum(), leaf)
    sal = drive(token_attribution_job(tiny_lm, tokens, a, w, method="saliency", target=expr))
    np.testing.assert_allclose(sal.values, g.norm(dim=-1).numpy(), rtol=1e-4, atol=1e-6)

    base = tiny_lm.single_token_id(" the") if tiny_lm.is_single_token(" the") else tiny_lm.single_token_id(" to")
    base_text = tiny_lm.tokens_of_ids([base]).strings[0]
    res = drive(token_attribution_job(tiny_lm, tokens, a, w, method="integrated_gradients", target=expr,
                                      baseline=base_text, steps=64))
    with torch.no_grad():
        b = tiny_lm.adapter.embed(torch.tensor([[base]]))[0, 0].double()
        gap = float(_ratio(tiny_lm, e[None], a, w)[0] - _ratio(tiny_lm, b.expand_as(e)[None], a, w)[0])
    delta = float(res.extras["convergence_delta"][0])
    assert res.values.sum() - gap == pytest.approx(delta, abs=1e-5 * max(1.0, abs(gap)))
    assert abs(delta) < 1e-2 * max(1.0, abs(gap)), (delta, gap)


def test_expression_target_refusals(lm_gpt2):
    tokens, a, _ = _setup(lm_gpt2)
    with pytest.raises(SpecError, match="wrong"):
        drive(token_attribution_job(lm_gpt2, tokens, a, None, method="saliency",
                                    target={"expression": "logit(answer) - logit(wrong)"}))
    with pytest.raises(SpecError, match="unknown target"):
        drive(token_attribution_job(lm_gpt2, tokens, a, None, method="saliency", target="kl_div"))
    with pytest.raises(SpecError, match="divides by zero"):
        drive(token_attribution_job(lm_gpt2, tokens, a, None, method="saliency",
                                    target={"expression": "logit(answer) / 0"}))
    # an expression that reads only the answer needs no wrong token
    res = drive(token_attribution_job(lm_gpt2, tokens, a, None, method="saliency",
                                      target={"expression": "2 * logprob(answer)"}))
    assert np.isfinite(res.values).all()


@pytest.mark.parametrize("kind", ["resid_pre", "resid_post"])
def test_tcav_expression_directional_derivative_equals_finite_differences(lm_llama, kind):
    from desktop_app.engine.activations_dataset import tokenize_texts
    from desktop_app.engine.capture import forward_logits, hooks
    from desktop_app.engine.tcav import expression_target, target_gradients

    lm = lm_llama
    docs = tokenize_texts(lm, ["Mary went to the park", "John and Alice went to the school"])
    a, w = lm.single_token_id(" Mary"), lm.single_token_id(" John")
    text = "prob(answer) / (prob(answer) + prob(wrong)) + 0.5 * logit(' the')"
    grads = drive(target_gradients(lm, docs, kind, expression_target(lm, {"expression": text}, " Mary", " John"),
                                   batch_size=2))
    the = lm.single_token_id(" the")

    def expr(logits):  # the same expression written out by hand, in float64
        p = torch.softmax(logits.double(), -1)
        return float(p[a] / (p[a] + p[w]) + 0.5 * logits[the].double())

    u = torch.randn(lm.info.d_model, generator=torch.Generator().manual_seed(1))
    u = u / u.norm()
    eps = 1e-2  # float32: curvature error ~eps^2, rounding ~1e-7 / eps
    for layer in range(lm.info.n_layers):
        for row, ids in enumerate(docs):
            def at(sign):
                def add(act):
                    act = act.clone()
                    act[:, -1] += sign * eps * u
                    return act
                with torch.no_grad(), hooks(lm, write={f"blocks.{layer}.hook_{kind}": add}):
                    return expr(forward_logits(lm, torch.tensor([ids]))[0, -1])
            fd = (at(1) - at(-1)) / (2 * eps)
            assert float(grads[layer, row] @ u.numpy()) == pytest.approx(fd, rel=1e-3, abs=1e-4)


def test_tcav_job_with_an_expression_target(lm_llama):
    from desktop_app.engine.tcav import tcav_job, target_gradients

    from planted import random_texts

    lm = lm_llama
    corpus = random_texts(lm, 60, 0)
    concept, rest, inputs = corpus[:8], corpus[8:50], corpus[50:]
    kw = dict(runs=2, seed=0, batch_size=8)
    written = drive(tcav_job(lm, concept, rest, inputs, {"expression": "logit(answer)"}, answer=" Mary", **kw))
    plain = drive(tcav_job(lm, concept, rest, inputs, " Mary", **kw))
    np.testing.assert_array_equal(written.extras["concept_scores"], plain.extras["concept_scores"])
    assert written.params["target"] == "logit(answer)" and int(written.extras["target_id"]) == -1
    with pytest.raises(SpecError, match="uses wrong"):
        drive(tcav_job(lm, concept, rest, inputs, "logit(answer) - logit(wrong)", answer=" Mary", **kw))
