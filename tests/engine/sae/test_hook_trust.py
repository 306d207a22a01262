"""Hook trust: an SAE is applied only at the hook (and to the model) its file names, unless force_hook."""
import json

import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.hook_trust import trusted_hook
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.inspect import fitted_hook
from desktop_app.engine.sae.jobs import sae_features_job, sae_metrics_job
from desktop_app.engine.sae.model import SAE, SAEConfig

D = 32
TEXT = "When Mary and John went to the store"


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


def random_sae(hook="blocks.0.hook_resid_post", d_in=D, **meta):
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=16, hook_name=hook, metadata=dict(meta)))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def one_sentence(err):
    msg = str(err.value)
    assert msg.endswith(".") and "\n" not in msg and msg.count(". ") == 0
    return msg


def test_other_hook_of_the_same_width_is_refused_naming_both(lm, tmp_path):
    folder = save_saelens(random_sae("blocks.0.hook_resid_post"), tmp_path / "sae")
    # resid_post of layer 1 has the same width (32): the shape check alone would accept it
    with pytest.raises(SAEError) as err:
        drive(sae_features_job(lm, TEXT, folder, hook="blocks.1.hook_resid_post"))
    msg = one_sentence(err)
    assert msg == (f"The SAE {folder} was trained on blocks.0.hook_resid_post but is applied to "
                   "blocks.1.hook_resid_post; apply it at blocks.0.hook_resid_post or choose one trained on "
                   "blocks.1.hook_resid_post, or set \"force_hook\": true to apply it anyway.")
    with pytest.raises(SAEError, match="blocks.0.hook_resid_post but is applied to blocks.1.hook_mlp_out"):
        drive(sae_metrics_job(lm, load_sae(folder), [TEXT], hook="blocks.1.hook_mlp_out"))


def test_force_hook_applies_it_and_says_so(lm, tmp_path):
    folder = save_saelens(random_sae("blocks.0.hook_resid_post"), tmp_path / "sae")
    result = drive(sae_features_job(lm, TEXT, folder, hook="blocks.1.hook_resid_post", force_hook=True, top_k=0))
    assert result.params["hook"] == "blocks.1.hook_resid_post" and result.params["force_hook"] is True
    from desktop_app.engine.capture import run_with_cache
    _, cache = run_with_cache(lm, [lm.tokenize(TEXT).ids], ["blocks.1.hook_resid_post"])
    x = cache["blocks.1.hook_resid_post"][0].numpy()
    sae = load_sae(folder)
    ref = np.maximum((x - sae.b_dec.numpy()) @ sae.W_enc.numpy() + sae.b_enc.numpy(), 0)
    np.testing.assert_allclose(result.values, ref, atol=1e-5)
    # the same hook, stated or not, is accepted
    assert drive(sae_features_job(lm, TEXT, folder, hook="blocks.0.hook_resid_post")).params["hook"] == \
        "blocks.0.hook_resid_post"
    assert drive(sae_features_job(lm, TEXT, folder)).params["hook"] == "blocks.0.hook_resid_post"


def test_other_model_is_refused_by_name_and_by_fingerprint(lm):
    sae = random_sae(model_name="gpt2-small")
    with pytest.raises(SAEError) as err:
        fitted_hook(lm, sae)
    assert one_sentence(err) == ("The SAE in memory was trained on model gpt2-small but the loaded model is gpt2; "
                                 "load gpt2-small, or set \"force_hook\": true to apply it anyway if it is the "
                                 "same model under another name.")
    assert fitted_hook(lm, sae, force_hook=True) == "blocks.0.hook_resid_post"
    assert fitted_hook(lm, random_sae(model_name="openai/GPT2")) == "blocks.0.hook_resid_post"
    # a fingerprint decides, whatever the name says
    assert fitted_hook(lm, random_sae(model_name="demo", model_fingerprint=lm.config_hash))
    with pytest.raises(SAEError, match=r"\(config hash 0123456789abcdef\) but the loaded model has config hash "
                                       + lm.config_hash):
        fitted_hook(lm, random_sae(model_name="gpt2", model_fingerprint="0123456789abcdef"))


def test_trusted_hook_helper_for_lenses_and_transcoders():
    assert trusted_hook("transcoder", "t.safetensors", "blocks.2.hook_mlp_out", None) == "blocks.2.hook_mlp_out"
    assert trusted_hook("lens", "lens/", None, "blocks.2.hook_resid_post") == "blocks.2.hook_resid_post"
    with pytest.raises(SAEError, match="^The transcoder t.safetensors was trained on blocks.2.hook_mlp_out but "
                                       "is applied to blocks.3.hook_mlp_out;"):
        trusted_hook("transcoder", "t.safetensors", "blocks.2.hook_mlp_out", "blocks.3.hook_mlp_out")
    with pytest.raises(SAEError, match="does not say which hook point it reads"):
        trusted_hook("lens", "lens/", None, None)


def test_unstated_normalisation_is_recorded_not_guessed(lm, tmp_path):
    folder = save_saelens(random_sae("blocks.0.hook_resid_post"), tmp_path / "sae")
    assert load_sae(folder).cfg.assumptions == []  # our own folders state everything
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("normalize_activations", "apply_b_dec_to_input"):
        cfg.pop(key)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)
    assert sae.cfg.normalize_activations == "none" and sae.cfg.apply_b_dec_to_input
    assert sae.cfg.assumptions == [
        f"{folder / 'cfg.json'} does not state normalize_activations; assumed none (the SAE reads raw activations).",
        f"{folder / 'cfg.json'} does not state apply_b_dec_to_input; assumed true (b_dec is subtracted first)."]
    result = drive(sae_features_job(lm, TEXT, folder))
    assert result.params["assumptions"] == sae.cfg.assumptions
    cfg["normalize_activations"] = "expected_average_only_in"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert "without a norm_scaling_factor; assumed the factor is folded" in load_sae(folder).cfg.assumptions[0]
    assert not any("norm_scaling_factor" in a for a in load_sae(folder, norm_scaling_factor=2.0).cfg.assumptions)


def test_gemma_scope_and_bare_safetensors_state_their_assumptions(tmp_path):
    from safetensors.torch import save_file
    sae = random_sae()
    path = tmp_path / "bare.safetensors"
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, str(path))
    loaded = load_sae(path, hook_name="blocks.0.hook_resid_post")
    assert any("apply_b_dec_to_input; assumed true" in a for a in loaded.cfg.assumptions)
    assert any("states no normalisation; assumed none" in a for a in loaded.cfg.assumptions)
    npz = tmp_path / "params.npz"
    np.savez(npz, **{k: v.numpy() for k, v in sae.state_dict().items()})
    assert "apply_b_dec_to_input false" in load_sae(npz, hook_name="blocks.0.hook_resid_post").cfg.assumptions[0]


def test_a_tuned_lens_of_another_model_is_refused_unless_forced(lm, tmp_path):
    import json as _json

    from desktop_app.engine.tuned_lens import TunedLens, load_tuned_lens, save_tuned_lens

    n, d = lm.info.n_layers, lm.info.d_model
    config = dict(base_model_name_or_path="EleutherAI/pythia-160m", d_model=d, num_hidden_layers=n, bias=True,
                  lens_type="linear_tuned_lens")
    lens = TunedLens(weights=torch.zeros(n, d, d), biases=torch.zeros(n, d), config=config)
    folder = save_tuned_lens(lens, tmp_path / "lens")
    with pytest.raises(SAEError) as err:
        load_tuned_lens(folder, lm)
    message = str(err.value)
    assert "pythia-160m" in message and lm.path.rstrip("/").split("/")[-1] in message and "force_hook" in message
    assert load_tuned_lens(folder, lm, force_hook=True).n_layers == n
    config["base_model_name_or_path"] = str(lm.path)  # the model it was trained on: accepted
    (folder / "config.json").write_text(_json.dumps(config))
    assert load_tuned_lens(folder, lm).n_layers == n
