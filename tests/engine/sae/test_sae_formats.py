"""Loading SAELens folders, Gemma Scope npz and plain safetensors; saving; each bad input."""
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file as save_np

from desktop_app.engine.errors import SAEError
from desktop_app.engine.sae.formats import check_fits, load_sae, require_hook, save_saelens
from desktop_app.engine.sae.model import SAE, SAEConfig

D_IN, D_SAE = 8, 24


def arrays(rng, arch="standard"):
    a = {"W_enc": rng.normal(size=(D_IN, D_SAE)), "W_dec": rng.normal(size=(D_SAE, D_IN)),
         "b_dec": rng.normal(size=D_IN)}
    if arch == "gated":
        a.update(b_gate=rng.normal(size=D_SAE), r_mag=rng.normal(size=D_SAE) * 0.2, b_mag=rng.normal(size=D_SAE))
    else:
        a["b_enc"] = rng.normal(size=D_SAE)
    if arch == "jumprelu":
        a["threshold"] = np.abs(rng.normal(size=D_SAE))
    return {k: v.astype(np.float32) for k, v in a.items()}


def write_saelens(folder, a, cfg):
    folder.mkdir(parents=True, exist_ok=True)
    save_np(a, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def test_saelens_v6_folder_loads_with_correct_values(tmp_path):
    a = arrays(np.random.default_rng(0), "topk")
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu", "k": 3,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": False,
           "metadata": {"hook_name": "blocks.1.hook_resid_post", "model_name": "tiny", "sae_lens_version": "6.5.0"}}
    folder = write_saelens(tmp_path / "sae", a, cfg)
    save_np({"sparsity": np.full(D_SAE, -2.0, np.float32)}, str(folder / "sparsity.safetensors"))
    sae = load_sae(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3
    assert sae.hook_name == "blocks.1.hook_resid_post"
    for name in a:
        np.testing.assert_array_equal(getattr(sae, name).numpy(), a[name])
    assert sae.log_sparsity is not None and float(sae.log_sparsity[0]) == -2.0
    x = np.random.default_rng(9).normal(size=(5, D_IN))
    pre = (x - a["b_dec"]) @ a["W_enc"] + a["b_enc"]
    f_ref = np.zeros_like(pre)
    for row in range(5):
        top = np.argsort(-pre[row])[:3]
        f_ref[row, top] = np.maximum(pre[row, top], 0)
    np.testing.assert_allclose(sae.encode(torch.tensor(x, dtype=torch.float32)).numpy(), f_ref, rtol=1e-4, atol=1e-4)


def test_pre_6_config_keys(tmp_path):
    a = arrays(np.random.default_rng(1))
    cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_point": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": 4}, "normalize_activations": False, "dtype": "torch.float32"}
    sae = load_sae(write_saelens(tmp_path / "old", a, cfg))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
    assert sae.hook_name == "blocks.0.hook_resid_pre" and sae.cfg.normalize_activations == "none"
    cfg2 = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.3.attn.hook_z",
            "normalize_activations": True}
    sae2 = load_sae(write_saelens(tmp_path / "old2", a, cfg2), norm_scaling_factor=2.0)
    assert sae2.cfg.reshape_activations == "hook_z"
    assert sae2.cfg.normalize_activations == "expected_average_only_in" and sae2.cfg.norm_scaling_factor == 2.0


def test_gemma_scope_npz(tmp_path):
    a = arrays(np.random.default_rng(2), "jumprelu")
    path = tmp_path / "params.npz"
    np.savez(path, **a)
    sae = load_sae(path, hook_name="blocks.4.hook_resid_post")
    assert sae.cfg.architecture == "jumprelu" and not sae.cfg.apply_b_dec_to_input
    assert sae.hook_name == "blocks.4.hook_resid_post"
    x = np.random.default_rng(3).normal(size=(6, D_IN))
    pre = x @ a["W_enc"] + a["b_enc"]  # Gemma Scope: no b_dec subtraction
    f_ref = np.where(pre > a["threshold"], np.maximum(pre, 0), 0)
    np.testing.assert_allclose(sae.encode(torch.tensor(x, dtype=torch.float32)).numpy(), f_ref, rtol=1e-4, atol=1e-4)
    assert load_sae(tmp_path).cfg.architecture == "jumprelu"  # the folder holding params.npz
    with pytest.raises(SAEError, match="hook"):
        require_hook(load_sae(path))


def test_plain_safetensors_and_gated_round_trip(tmp_path):
    a = arrays(np.random.default_rng(4), "gated")
    path = tmp_path / "my_sae.safetensors"
    save_np(a, str(path))
    sae = load_sae(path, hook_name="blocks.0.hook_mlp_out")
    assert sae.cfg.architecture == "gated" and sae.cfg.apply_b_dec_to_input
    x = torch.randn(7, D_IN)
    out = save_saelens(sae, tmp_path / "saved")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["metadata"]["hook_name"] == "blocks.0.hook_mlp_out"
    again = load_sae(out)
    torch.testing.assert_close(again(x)[0], sae(x)[0], rtol=0, atol=0)


def test_save_folds_scaling_factor(tmp_path):
    sae = SAE(SAEConfig(architecture="topk", d_in=D_IN, d_sae=D_SAE, k=3, hook_name="blocks.0.hook_resid_pre",
                        normalize_activations="expected_average_only_in", norm_scaling_factor=4.0))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.randn(9, D_IN)
    again = load_sae(save_saelens(sae, tmp_path / "s"))
    assert again.cfg.normalize_activations == "none"
    torch.testing.assert_close(again(x)[0], sae(x)[0], rtol=1e-5, atol=1e-5)


# --- bad input ----------------------------------------------------------------------------------------

def one_sentence(err):
    msg = str(err.value)
    assert msg.endswith(".") and "\n" not in msg
    return msg


def test_folder_that_is_not_an_sae(tmp_path):
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(SAEError) as err:
        load_sae(tmp_path)
    assert "is not an SAE" in one_sentence(err)
    with pytest.raises(SAEError) as err:
        load_sae(tmp_path / "missing")
    assert "does not exist" in one_sentence(err)


def test_unknown_architecture(tmp_path):
    folder = write_saelens(tmp_path / "s", arrays(np.random.default_rng(0)),
                           {"architecture": "matryoshka_batchtopk", "d_in": D_IN, "d_sae": D_SAE})
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "matryoshka_batchtopk" in one_sentence(err)


def test_shapes_disagree_with_config(tmp_path):
    folder = write_saelens(tmp_path / "s", arrays(np.random.default_rng(0)),
                           {"architecture": "standard", "d_in": D_IN, "d_sae": 2 * D_SAE})
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "d_sae=48" in one_sentence(err)


def test_missing_tensor(tmp_path):
    a = arrays(np.random.default_rng(0))
    a.pop("b_enc")
    folder = write_saelens(tmp_path / "s", a, {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "b_enc" in one_sentence(err)


def test_corrupt_safetensors_and_cfg(tmp_path):
    folder = write_saelens(tmp_path / "s", arrays(np.random.default_rng(0)),
                           {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "not a valid safetensors" in one_sentence(err)
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "JSON" in one_sentence(err)


def test_corrupt_or_pickled_npz(tmp_path):
    bad = tmp_path / "params.npz"
    bad.write_bytes(b"PK\x03\x04 garbage")
    with pytest.raises(SAEError):
        load_sae(bad, hook_name="blocks.0.hook_resid_post")
    pickled = tmp_path / "pickled" / "params.npz"
    pickled.parent.mkdir()
    np.savez(pickled, W_enc=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(SAEError) as err:
        load_sae(pickled)
    assert "pickled" in one_sentence(err)


def test_check_fits_names_both_widths(tmp_path):
    sae = SAE(SAEConfig(architecture="standard", d_in=D_IN, d_sae=D_SAE, hook_name="blocks.1.hook_resid_pre"))
    check_fits(sae, "blocks.1.hook_resid_pre", D_IN)
    with pytest.raises(SAEError) as err:
        check_fits(sae, "blocks.1.hook_resid_pre", 64)
    msg = one_sentence(err)
    assert "8" in msg and "64" in msg
    z_sae = SAE(SAEConfig(architecture="standard", d_in=12, d_sae=D_SAE, hook_name="blocks.1.attn.hook_z"))
    check_fits(z_sae, "blocks.1.attn.hook_z", (3, 4))
    with pytest.raises(SAEError, match="width 12"):
        check_fits(z_sae, "blocks.1.attn.hook_z", (4, 4))


# ---- damaged SAE files (issue 16): one sentence naming the file --------------------------------------------

def test_nan_weights_are_refused(tmp_path):
    a = arrays(np.random.default_rng(3))
    a["W_dec"][2, 1] = np.nan
    a["b_enc"][0] = np.inf
    folder = write_saelens(tmp_path / "s", a, {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "NaN or infinite" in one_sentence(err) and "sae_weights.safetensors" in str(err.value)
    plain = tmp_path / "plain.safetensors"
    save_np(a, str(plain))
    with pytest.raises(SAEError, match="NaN or infinite"):
        load_sae(plain, hook_name="blocks.0.hook_resid_post")


@pytest.mark.parametrize("field, value, needle", [
    ("k", "abc", "k = 'abc'"), ("apply_b_dec_to_input", "false", "apply_b_dec_to_input"),
    ("d_in", "8", "d_in"), ("norm_scaling_factor", "big", "norm_scaling_factor"), ("hook_name", 5, "hook_name"),
    ("metadata", ["x"], "metadata"), ("dtype", 32, "dtype"),
    ("activation_fn_kwargs", {"k": "3"}, "activation_fn_kwargs.k"),
    ("normalize_activations", 1.5, "normalize_activations"), ("d_sae", 0, "d_sae"),
])
def test_wrong_typed_cfg_fields_are_one_sentence(tmp_path, field, value, needle):
    cfg = {"architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": 3}
    cfg[field] = value
    folder = write_saelens(tmp_path / "s", arrays(np.random.default_rng(4)), cfg)
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert needle in one_sentence(err) and "cfg.json" in str(err.value)


def test_a_safetensors_header_that_lies_is_refused_before_reading(tmp_path):
    folder = write_saelens(tmp_path / "s", arrays(np.random.default_rng(5)),
                           {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE})
    header = json.dumps({"W_enc": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}})
    raw = header.encode()
    (folder / "sae_weights.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(64))
    with pytest.raises(SAEError) as err:
        load_sae(folder)
    assert "truncated" in one_sentence(err)
