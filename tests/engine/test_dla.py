"""Direct logit attribution against a formula written from the weights (TransformerLens `logit_attrs` with
the final norm's cached scale), and the sum of the parts against the model's own logit difference."""
import numpy as np
import pytest
import torch

from desktop_app.engine.dla import direct_logit_attribution_job
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _reference(lm, ids, a_id, w_id):
    """Per-head contributions [layer, head] and the model's logit difference, from bare torch hooks."""
    model, ad, info = lm.model, lm.adapter, lm.info
    zs, finals = {}, {}
    handles = [ad.o_proj(L).register_forward_pre_hook(lambda m, args, L=L: zs.__setitem__(L, args[0][0, -1].double()))
               for L in range(info.n_layers)]
    handles.append(ad.final_norm.register_forward_pre_hook(lambda m, args: finals.__setitem__("x", args[0][0, -1].double())))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    finally:
        for h in handles:
            h.remove()
    x = finals["x"]
    norm = ad.final_norm
    if isinstance(norm, torch.nn.LayerNorm):
        scale = torch.sqrt(x.var(unbiased=False) + norm.eps)
        apply = lambda c: (c - c.mean(-1, keepdim=True)) / scale * norm.weight.double()  # noqa: E731
    else:  # Llama RMSNorm
        scale = torch.sqrt(x.pow(2).mean() + norm.variance_epsilon)
        apply = lambda c: c / scale * norm.weight.double()  # noqa: E731
    direction = ad.unembed.weight[a_id].double() - ad.unembed.weight[w_id].double()
    out = np.zeros((info.n_layers, info.n_heads))
    dh = info.d_head
    for L in range(info.n_layers):
        o = ad.o_proj(L)
        for h in range(info.n_heads):
            zh = zs[L][h * dh:(h + 1) * dh]
            if type(o).__name__ == "Conv1D":
                w_oh = o.weight[h * dh:(h + 1) * dh, :].double()
            else:
                w_oh = o.weight[:, h * dh:(h + 1) * dh].double().T
            out[L, h] = float(apply(zh @ w_oh) @ direction)
    return out, float(logits[a_id] - logits[w_id])


@pytest.mark.parametrize("granularity", ["heads", "layers"])
def test_parts_sum_to_the_logit_difference(tiny_lm, granularity):
    tokens = tiny_lm.tokenize(PROMPT)
    a, w = tiny_lm.single_token_id(" Mary"), tiny_lm.single_token_id(" John")
    res = drive(direct_logit_attribution_job(tiny_lm, tokens, a, w, granularity=granularity))
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=torch.tensor([tokens.ids])).logits[0, -1].double()
    total = float(logits[a] - logits[w])
    other = res.extras["mlp_layers"].sum() if granularity == "heads" else 0.0
    parts = res.values.sum() + other + res.extras["embed"][0] + res.extras["bias"][0]
    assert parts == pytest.approx(total, abs=1e-4 * max(1.0, abs(total)))
    assert res.clean_metric == pytest.approx(total, abs=1e-5)
    if granularity == "layers":
        assert res.dims == ["layer", "sublayer"] and res.labels["sublayer"] == ["attn", "mlp"]
        np.testing.assert_allclose(res.values[:, 1], res.extras["mlp_layers"], atol=1e-6)


def test_heads_equal_the_weight_formula(tiny_lm):
    tokens = tiny_lm.tokenize(PROMPT)
    a, w = tiny_lm.single_token_id(" Mary"), tiny_lm.single_token_id(" John")
    res = drive(direct_logit_attribution_job(tiny_lm, tokens, a, w, granularity="heads"))
    ref, _ = _reference(tiny_lm, tokens.ids, a, w)
    assert res.dims == ["layer", "head"]
    np.testing.assert_allclose(res.values, ref, atol=1e-5)


def test_swapping_answers_negates_every_part(lm_llama):
    tokens = lm_llama.tokenize(PROMPT)
    a, w = lm_llama.single_token_id(" Mary"), lm_llama.single_token_id(" John")
    one = drive(direct_logit_attribution_job(lm_llama, tokens, a, w))
    two = drive(direct_logit_attribution_job(lm_llama, tokens, w, a))
    np.testing.assert_allclose(one.values, -two.values, atol=1e-6)


def test_real_model_and_bad_input(stories_dir):
    from desktop_app.engine.loading import load_model

    lm = load_model(stories_dir, dtype="float32", device="cpu")
    tokens = lm.tokenize("Once upon a time, there was a little girl named")
    a, w = lm.single_token_id(" Lily"), lm.single_token_id(" the")
    res = drive(direct_logit_attribution_job(lm, tokens, a, w))
    ref, total = _reference(lm, tokens.ids, a, w)
    np.testing.assert_allclose(res.values, ref, atol=1e-4)
    assert res.extras["logit_diff"][0] == pytest.approx(total, abs=1e-4)
    with pytest.raises(SpecError):
        drive(direct_logit_attribution_job(lm, tokens, a, a))
    with pytest.raises(SpecError):
        drive(direct_logit_attribution_job(lm, tokens, a, w, granularity="neurons"))


def test_a_final_norm_that_is_not_affine_at_a_frozen_scale_is_refused(lm_gpt2):
    class TanhNorm(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(d))

        def forward(self, x):
            return torch.tanh(x) * self.weight

    tokens = lm_gpt2.tokenize(PROMPT)
    a, w = lm_gpt2.single_token_id(" Mary"), lm_gpt2.single_token_id(" John")
    original = lm_gpt2.adapter.final_norm
    lm_gpt2.adapter.final_norm = TanhNorm(lm_gpt2.info.d_model)
    try:
        with pytest.raises(SpecError, match="refused: the final norm"):
            drive(direct_logit_attribution_job(lm_gpt2, tokens, a, w))
    finally:
        lm_gpt2.adapter.final_norm = original


@pytest.mark.parametrize("softcap", [30.0, None])
def test_gemma2_post_norms_are_refused_per_head_and_split_per_layer(softcap):
    """Gemma 2 normalises the attention output after the output projection, so heads do not add up to it
    (refused with the measured difference); whole sublayers still do. A tanh logit cap is refused outright."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from desktop_app.engine.loading import wrap_model
    from desktop_app.engine.model import TokenInfo

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
                          final_logit_softcapping=softcap, attn_implementation="eager")
    lm = wrap_model(Gemma2ForCausalLM(config).float())
    ids = list(range(5, 17))
    tokens = TokenInfo(ids, [str(i) for i in ids], [str(i) for i in ids], False)
    if softcap:
        with pytest.raises(SpecError, match="caps its logits"):
            drive(direct_logit_attribution_job(lm, tokens, 3, 4))
        return
    with pytest.raises(SpecError, match="refused: the sum of layer 0's head outputs"):
        drive(direct_logit_attribution_job(lm, tokens, 3, 4, granularity="heads"))
    res = drive(direct_logit_attribution_job(lm, tokens, 3, 4, granularity="layers"))
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0, -1].double()
    total = float(logits[3] - logits[4])
    assert res.values.sum() + res.extras["embed"][0] + res.extras["bias"][0] == pytest.approx(total, abs=1e-4)
