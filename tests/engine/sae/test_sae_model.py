"""SAE encode/decode of every architecture against formulas written here in plain numpy."""
import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.sae.model import SAE, SAEConfig

D_IN, D_SAE = 12, 40


def random_sae(arch, seed=0, **cfg_kw):
    rng = np.random.default_rng(seed)
    cfg = SAEConfig(architecture=arch, d_in=cfg_kw.pop("d_in", D_IN), d_sae=D_SAE, **cfg_kw)
    sae = SAE(cfg)
    params = {}
    with torch.no_grad():
        for name, p in sae.named_parameters():
            value = rng.normal(size=tuple(p.shape)).astype(np.float32)
            if name == "threshold":
                value = np.abs(value) * 0.5
            if name == "r_mag":
                value *= 0.3
            p.copy_(torch.from_numpy(value))
            params[name] = value.astype(np.float64)
    return sae, params


def np_reference(arch, p, x, *, k=None, apply_b_dec=True, rescale=False, scale=None):
    """Independent formulas (SAELens semantics)."""
    x_in = x * scale if scale else x
    centred = x_in - (p["b_dec"] if apply_b_dec else 0.0)
    if arch == "gated":
        gate = (centred @ p["W_enc"] + p["b_gate"]) > 0
        mag = np.maximum(centred @ (p["W_enc"] * np.exp(p["r_mag"])) + p["b_mag"], 0)
        f = gate * mag
    else:
        pre = centred @ p["W_enc"] + p["b_enc"]
        if arch == "standard":
            f = np.maximum(pre, 0)
        elif arch == "jumprelu":
            f = np.where(pre > p["threshold"], np.maximum(pre, 0), 0.0)
        else:
            norms = np.linalg.norm(p["W_dec"], axis=1)
            if rescale:
                pre = pre * norms
            f = np.zeros_like(pre)
            for row in range(pre.shape[0]):
                top = np.argsort(-pre[row])[:k]
                f[row, top] = np.maximum(pre[row, top], 0)
    dec_in = f / np.linalg.norm(p["W_dec"], axis=1) if (arch == "topk" and rescale) else f
    x_hat = dec_in @ p["W_dec"] + p["b_dec"]
    if scale:
        x_hat = x_hat / scale
    return f, x_hat


CASES = [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
    ("jumprelu", {}),
    ("gated", {}),
    ("topk", {"k": 5}),
    ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}),
    ("standard", {"normalize_activations": "expected_average_only_in", "norm_scaling_factor": 2.5}),
]


@pytest.mark.parametrize("arch,kw", CASES)
def test_encode_decode_match_numpy(arch, kw):
    sae, p = random_sae(arch, **dict(kw))
    x = np.random.default_rng(1).normal(size=(30, D_IN))
    f_ref, x_hat_ref = np_reference(arch, p, x, k=kw.get("k"), apply_b_dec=kw.get("apply_b_dec_to_input", True),
                                    rescale=kw.get("rescale_acts_by_decoder_norm", False),
                                    scale=kw.get("norm_scaling_factor"))
    xt = torch.tensor(x, dtype=torch.float32)
    f = sae.encode(xt)
    assert f.shape == (30, D_SAE)
    np.testing.assert_allclose(f.numpy(), f_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sae.decode(f).numpy(), x_hat_ref, rtol=1e-4, atol=1e-4)
    x_hat, f2 = sae(xt)
    np.testing.assert_allclose(x_hat.numpy(), x_hat_ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(f, f2)
    if arch == "topk":
        assert int((f != 0).sum(dim=-1).max()) <= kw["k"]
    else:
        assert (f != 0).any()


def test_fold_scaling_factor_keeps_the_function():
    sae, _ = random_sae("standard", normalize_activations="expected_average_only_in", norm_scaling_factor=3.0)
    x = torch.randn(20, D_IN)
    before, f_before = sae(x)
    sae.fold_scaling_factor()
    assert sae.cfg.normalize_activations == "none"
    after, f_after = sae(x)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(f_after, f_before, rtol=1e-5, atol=1e-5)


def test_constant_norm_rescale_and_layer_norm():
    x = torch.randn(10, D_IN) * 4 + 1
    sae, p = random_sae("standard", normalize_activations="constant_norm_rescale")
    xn = x.numpy().astype(np.float64)
    coeff = np.sqrt(D_IN) / np.linalg.norm(xn, axis=1, keepdims=True)
    _, ref = np_reference("standard", p, xn * coeff)
    np.testing.assert_allclose(sae(x)[0].numpy(), ref / coeff, rtol=1e-4, atol=1e-4)

    sae, p = random_sae("standard", normalize_activations="layer_norm")
    mu = xn.mean(axis=1, keepdims=True)
    std = (xn - mu).std(axis=1, ddof=1, keepdims=True)
    _, ref = np_reference("standard", p, (xn - mu) / (std + 1e-5))
    np.testing.assert_allclose(sae(x)[0].numpy(), ref * std + mu, rtol=1e-4, atol=1e-4)


def test_hook_z_sae_flattens_heads():
    n_heads, d_head = 3, 4
    sae, p = random_sae("standard", d_in=n_heads * d_head, hook_name="blocks.2.attn.hook_z")
    assert sae.cfg.reshape_activations == "hook_z"
    z = torch.randn(2, 5, n_heads, d_head)  # [batch, pos, heads, d_head]
    f = sae.encode(z)
    assert f.shape == (2, 5, D_SAE)
    f_ref, x_hat_ref = np_reference("standard", p, z.reshape(10, n_heads * d_head).numpy().astype(np.float64))
    np.testing.assert_allclose(f.reshape(10, D_SAE).numpy(), f_ref, rtol=1e-4, atol=1e-4)
    x_hat, _ = sae(z)
    assert x_hat.shape == z.shape
    np.testing.assert_allclose(x_hat.reshape(10, -1).numpy(), x_hat_ref, rtol=1e-4, atol=1e-4)
    assert sae.decode(f, d_head=d_head).shape == z.shape


def test_wrong_width_and_bad_config_are_one_sentence_errors():
    sae, _ = random_sae("standard", hook_name="blocks.0.hook_resid_pre")
    with pytest.raises(SAEError, match="width 12"):
        sae.encode(torch.randn(3, 7))
    with pytest.raises(SAEError, match="not supported"):
        SAEConfig(architecture="matryoshka", d_in=4, d_sae=8)
    with pytest.raises(SAEError, match="positive k"):
        SAEConfig(architecture="topk", d_in=4, d_sae=8)
