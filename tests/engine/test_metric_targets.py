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
