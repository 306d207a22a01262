"""SAE on a tiny GPT-2 (d_model 32, 4 heads): activations, CE with the SAE spliced in, interventions.
References come from the Hugging Face model directly (hidden_states, its own loss, a hand-made hook)."""
import pytest
import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.loading import load_model
from desktop_app.engine.sae.inspect import (FeatureEdit, ce_loss_with_sae, feature_activations, feature_table,
                                            intervene, top_features)
from desktop_app.engine.sae.model import SAE, SAEConfig

D = 32
HOOK = "blocks.1.hook_resid_pre"  # = output of block 0 = hidden_states[1]


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def ids(lm):
    return torch.tensor([lm.tokenize("When Mary and John went to the store, John gave a drink to").ids])


def identity_sae():
    """relu(x) - relu(-x) = x: features 0..D-1 are +x_i, D..2D-1 are -x_i; reconstructs exactly."""
    sae = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=2 * D, hook_name=HOOK, apply_b_dec_to_input=False))
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def random_sae(seed=0):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="topk", d_in=D, d_sae=96, k=6, hook_name=HOOK))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def hf_hidden(lm, ids, layer):
    with torch.no_grad():
        return lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]


def test_feature_activations_match_hidden_states(lm, ids):
    sae = random_sae()
    acts = feature_activations(lm, sae, ids)
    torch.testing.assert_close(acts, sae.encode(hf_hidden(lm, ids, 1)), rtol=1e-5, atol=1e-5)
    values, idx = top_features(acts, 3)
    assert values.shape == (ids.shape[1], 3) and torch.equal(acts.gather(-1, idx), values)
    table, chosen = feature_table(acts, 3)
    assert table.shape == (ids.shape[1], len(chosen)) and set(idx[values > 0].tolist()) == set(chosen)
    assert feature_table(acts, 0)[0].shape == (ids.shape[1], 96)


def test_ce_loss_spliced_clean_zero(lm, ids):
    with torch.no_grad():
        hf_loss = float(lm.model(input_ids=ids, labels=ids).loss)
    exact = ce_loss_with_sae(lm, identity_sae(), ids)
    assert exact["clean"] == pytest.approx(hf_loss, abs=1e-5)
    assert exact["spliced"] == pytest.approx(hf_loss, abs=1e-5)
    assert exact["recovered"] == pytest.approx(1.0, abs=1e-4)
    assert exact["zero_ablated"] != pytest.approx(hf_loss, abs=1e-3)
    lossy = ce_loss_with_sae(lm, random_sae(), ids)
    assert lossy["clean"] == exact["clean"] and lossy["zero_ablated"] == exact["zero_ablated"]
    assert lossy["spliced"] != pytest.approx(lossy["clean"], abs=1e-4)


def test_interventions_against_a_hand_written_hook(lm, ids):
    clean = lm.model(input_ids=ids).logits.detach()
    sae = random_sae()
    torch.testing.assert_close(intervene(lm, sae, ids, []), clean, rtol=1e-5, atol=1e-5)  # error term kept

    def reference(edit_resid):
        def hook(_module, _args, output):
            return (edit_resid(output[0]),) + tuple(output[1:]) if isinstance(output, tuple) else edit_resid(output)
        handle = lm.model.transformer.h[0].register_forward_hook(hook)
        try:
            with torch.no_grad():
                return lm.model(input_ids=ids).logits
        finally:
            handle.remove()

    def steer(resid):
        resid = resid.clone()
        resid[:, 2] += 1.5 * sae.W_dec[7]
        return resid
    got = intervene(lm, sae, ids, [FeatureEdit(7, "steer", 1.5, positions=[2])])
    torch.testing.assert_close(got, reference(steer), rtol=1e-4, atol=1e-4)

    ident = identity_sae()

    def ablate(resid):  # identity SAE: dropping feature 3 (the +x_3 part) leaves -relu(-x_3)
        resid = resid.clone()
        resid[..., 3] = -torch.relu(-resid[..., 3])
        return resid
    got = intervene(lm, ident, ids, [FeatureEdit(3, "ablate")])
    torch.testing.assert_close(got, reference(ablate), rtol=1e-4, atol=1e-4)

    def clamp(resid):
        resid = resid.clone()
        resid[..., 5] = 2.0 - torch.relu(-resid[..., 5])
        return resid
    got = intervene(lm, ident, ids, [FeatureEdit(5, "clamp", 2.0)])
    torch.testing.assert_close(got, reference(clamp), rtol=1e-4, atol=1e-4)


def test_wrong_width_sae_is_refused(lm, ids):
    sae = SAE(SAEConfig(architecture="standard", d_in=48, d_sae=64, hook_name=HOOK))
    with pytest.raises(SAEError, match="48.*32"):
        feature_activations(lm, sae, ids)
    with pytest.raises(SAEError, match="does not exist"):
        intervene(lm, identity_sae(), ids, [FeatureEdit(500, "ablate")])


def test_hook_z_sae_on_the_model(lm, ids):
    """An SAE on blocks.0.attn.hook_z ([pos, 4 heads, 8]) reads the flattened heads; with no edits the
    error term keeps the logits unchanged, and ablating its features changes them."""
    hook = "blocks.0.attn.hook_z"
    g = torch.Generator().manual_seed(3)
    sae = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=64, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    from desktop_app.engine.capture import run_with_cache
    _, cache = run_with_cache(lm, ids, [hook])
    z = cache[hook][0]
    assert z.shape[-2:] == (4, 8)
    torch.testing.assert_close(feature_activations(lm, sae, ids), sae.encode(z.reshape(-1, D)))
    clean = lm.model(input_ids=ids).logits.detach()
    torch.testing.assert_close(intervene(lm, sae, ids, []), clean, rtol=1e-5, atol=1e-5)
    active = int(sae.encode(z.reshape(-1, D)).sum(0).argmax())
    assert not torch.allclose(intervene(lm, sae, ids, [FeatureEdit(active, "ablate")]), clean, atol=1e-4)
