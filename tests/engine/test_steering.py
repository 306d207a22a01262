"""Steering vectors: directions against numpy, the llama.cpp control-vector file read back with gguf, and
steering that moves the next-token distribution the way the direction says."""
import numpy as np
import pytest
import torch

from desktop_app.engine.capture import forward_logits, hooks, run_with_cache
from desktop_app.engine.control_vector import (control_vector_as_directions, control_vector_writes_for,
                                               llama_cpp_layers, read_control_vector, write_control_vector,
                                               write_directions_safetensors)
from desktop_app.engine.edits import add_direction, intervention_job
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import drive
from desktop_app.engine.steering import steering_intervention_job, steering_vector_job

gguf = pytest.importorskip("gguf")

PLACES = ["park", "store", "school", "beach", "office", "market"]
POSITIVE = [f"When Alice went to the {p}, Mary" for p in PLACES]
NEGATIVE = [f"When Alice went to the {p}, John" for p in PLACES]


def _last_acts(lm, texts, kind):
    out = []
    for t in texts:
        names = [f"blocks.{L}.hook_{kind}" for L in range(lm.info.n_layers)]
        _, cache = run_with_cache(lm, [lm.tokenize(t).ids], names)
        out.append(np.stack([cache[n][0, -1].numpy() for n in names]))
    return np.stack(out, axis=1)  # [layer, text, d]


@pytest.mark.parametrize("kind", ["resid_post", "resid_pre"])
def test_mean_diff_equals_numpy(lm_llama, kind):
    r = drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE[:4], method="mean_diff", hook=kind))
    pos, neg = _last_acts(lm_llama, POSITIVE, kind), _last_acts(lm_llama, NEGATIVE[:4], kind)
    assert r.dims == ["layer", "d_model"] and r.shape == (2, 64)
    np.testing.assert_allclose(r.values, pos.mean(1) - neg.mean(1), atol=1e-5)


def test_pca_is_the_top_eigenvector_of_the_pair_differences(lm_llama):
    r = drive(steering_vector_job(lm_llama, pairs=list(zip(POSITIVE, NEGATIVE)), method="pca"))
    deltas = (_last_acts(lm_llama, POSITIVE, "resid_post") - _last_acts(lm_llama, NEGATIVE, "resid_post")).astype(np.float64)
    for layer in range(2):
        _, vecs = np.linalg.eigh(deltas[layer].T @ deltas[layer])  # an independent route: the scatter matrix
        v = vecs[:, -1] * np.sign(np.mean(deltas[layer] @ vecs[:, -1]))
        np.testing.assert_allclose(r.values[layer], v, atol=1e-5)
    assert np.allclose(r.extras["norm"], 1.0, atol=1e-6)


def test_pca_needs_pairs(lm_llama):
    with pytest.raises(SpecError, match="pca needs contrastive pairs"):
        drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE[:3], method="pca"))
    with pytest.raises(SpecError, match="negative texts is empty"):
        drive(steering_vector_job(lm_llama, POSITIVE, []))


def test_control_vector_gguf_reads_back(lm_llama, tmp_path):
    r = drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE))
    layers, dropped = llama_cpp_layers("resid_post", r.values)
    assert sorted(layers) == [1] and dropped == [0]  # llama.cpp never steers block 0's output
    path = write_control_vector(tmp_path / "cv.gguf", layers, "llama")
    reader = gguf.GGUFReader(str(path))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "controlvector"
    hint = reader.fields["controlvector.model_hint"]
    assert bytes(hint.parts[hint.data[0]]).decode() == "llama"
    count = reader.fields["controlvector.layer_count"]
    assert int(count.parts[count.data[0]][0]) == 1
    assert [t.name for t in reader.tensors] == ["direction.1"]
    t = reader.tensors[0]
    assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [64]
    np.testing.assert_array_equal(np.array(t.data), r.values[1])
    back, meta = read_control_vector(path)
    assert meta["width"] == 64 and meta["layer_count"] == 1
    np.testing.assert_array_equal(control_vector_as_directions(lm_llama, path)[1], r.values[1])
    # resid_pre of block L is the output of block L - 1
    pre_layers, pre_dropped = llama_cpp_layers("resid_pre", np.stack([r.values[0], r.values[1], r.values[1]]))
    assert sorted(pre_layers) == [1] and pre_dropped == [0, 1]


def test_steering_with_the_imported_gguf_moves_the_distribution(lm_llama, tmp_path):
    lm = lm_llama
    r = drive(steering_vector_job(lm, POSITIVE, NEGATIVE))
    path = write_control_vector(tmp_path / "cv.gguf", llama_cpp_layers("resid_post", r.values)[0], "llama")
    prompt = "When Bob went to the cafe, Sarah gave a book to"
    ids = torch.tensor([lm.tokenize(prompt).ids])
    # where llama.cpp adds it: the output of block 1, every position; reference by hand through the final norm
    _, cache = run_with_cache(lm, ids, ["blocks.1.hook_resid_post"])
    coef = 2.0
    steered_resid = cache["blocks.1.hook_resid_post"] + coef * torch.as_tensor(r.values[1])
    with torch.no_grad():
        ref = lm.adapter.logits_from_resid(steered_resid)[0, -1]
    with torch.no_grad(), hooks(lm, write=control_vector_writes_for(lm, path, coef)):
        steered = forward_logits(lm, ids)[0, -1]
    np.testing.assert_allclose(steered.numpy(), ref.numpy(), atol=1e-4)
    # the expected direction: the logit change follows the positives' logits minus the negatives'
    def mean_logits(texts):
        return torch.stack([forward_logits(lm, torch.tensor([lm.tokenize(t).ids]))[0, -1] for t in texts]).mean(0)
    with torch.no_grad():
        contrast = (mean_logits(POSITIVE) - mean_logits(NEGATIVE)).numpy()
        base = forward_logits(lm, ids)[0, -1].numpy()
    for c in (1.0, -1.0):
        res = drive(steering_intervention_job(lm, prompt, control_vector_as_directions(lm, path), "resid_post",
                                              coefficient=c, layers=[1], n_continue=3))
        shift = res.extras["prob_shift"]
        with torch.no_grad(), hooks(lm, write=control_vector_writes_for(lm, path, c)):
            after = forward_logits(lm, ids)[0, -1].numpy()
        assert np.sign(float((after - base) @ contrast)) == np.sign(c)
        assert float(res.extras["kl"]) > 0 and abs(float(shift.sum())) < 1e-5
        assert res.extras["continuation"].shape == (2,)


def test_control_vector_of_another_width_is_refused(lm_gpt2, lm_llama, tmp_path):
    r = drive(steering_vector_job(lm_gpt2, POSITIVE, NEGATIVE))
    path = write_control_vector(tmp_path / "gpt2.gguf", llama_cpp_layers("resid_post", r.values)[0], "gpt2")
    with pytest.raises(SpecError, match="width 32 but this model's d_model is 64"):
        control_vector_writes_for(lm_llama, path)
    with pytest.raises(SpecError, match="not a control vector|not a readable GGUF"):
        other = tmp_path / "x.gguf"
        other.write_bytes(b"GGUF")
        read_control_vector(other)


def test_zero_coefficient_changes_nothing(lm_llama):
    r = drive(intervention_job(lm_llama, "Mary went to the park and",
                               {"blocks.0.hook_resid_post": add_direction(np.ones(64), 0.0)}, n_continue=4))
    assert float(r.extras["kl"]) == pytest.approx(0.0, abs=1e-7)
    np.testing.assert_array_equal(r.extras["continuation_before_ids"], r.extras["continuation_after_ids"])


def test_continuations_match_a_plain_greedy_loop(lm_llama):
    text, n = "Mary went to the park and", 4
    writes = {"blocks.1.hook_resid_post": add_direction(np.linspace(-3, 3, 64), 2.0)}
    r = drive(intervention_job(lm_llama, text, writes, n_continue=n))
    for edit, got in ((None, r.extras["continuation_before_ids"]), (writes, r.extras["continuation_after_ids"])):
        ids = torch.tensor([lm_llama.tokenize(text).ids])
        expected = []
        for _ in range(n):
            with torch.no_grad(), hooks(lm_llama, write=edit):
                nxt = int(forward_logits(lm_llama, ids)[0, -1].argmax())
            expected.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
        np.testing.assert_array_equal(got, expected[:len(got)])
        assert len(got) == n or got[-1] == lm_llama.tokenizer.eos_token_id


def test_safetensors_export_reads_back(lm_llama, tmp_path):
    from safetensors.numpy import load_file
    from safetensors import safe_open

    r = drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE))
    p = write_directions_safetensors(tmp_path / "d.safetensors", r.values, "resid_post", {"method": "mean_diff"})
    back = load_file(str(p))
    np.testing.assert_array_equal(back["blocks.1.hook_resid_post"], r.values[1])
    with safe_open(str(p), "np") as fh:
        assert fh.metadata()["hook"] == "resid_post"


def test_result_exports(lm_llama, tmp_path):
    from desktop_app.engine.control_vector import export_result_gguf, export_result_safetensors

    pre = drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE, hook="resid_pre"))
    # resid_pre 0 is the embedding and resid_pre 1 block 0's output: nothing llama.cpp can steer in 2 layers
    with pytest.raises(SpecError, match="no layer llama.cpp can steer"):
        export_result_gguf(pre, tmp_path / "pre.gguf")
    assert not (tmp_path / "pre.gguf").exists()
    post = drive(steering_vector_job(lm_llama, POSITIVE, NEGATIVE, hook="resid_post"))
    path, dropped = export_result_gguf(post, tmp_path / "post.gguf")
    assert dropped == [0] and sorted(read_control_vector(path)[0]) == [1]
    st = export_result_safetensors(post, tmp_path / "r.safetensors")
    assert st.is_file()


def test_one_edit_mechanism_for_sae_features_and_probe_directions(lm_llama):
    """SAE feature edits run through the same runner as directions and give sae_intervention_job's numbers."""
    from desktop_app.engine.probes import probe_job
    from desktop_app.engine.sae.inspect import FeatureEdit, edit_hook
    from desktop_app.engine.sae.jobs import sae_intervention_job
    from desktop_app.engine.sae.model import SAE, SAEConfig
    from desktop_app.engine.steering import steering_writes

    hook = "blocks.1.hook_resid_pre"
    g = torch.Generator().manual_seed(0)
    sae = SAE(SAEConfig(architecture="standard", d_in=64, d_sae=16, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    edits = [FeatureEdit(3, "steer", 5.0)]
    text = "When Mary and John went to the store, John gave"
    ours = drive(intervention_job(lm_llama, text, {hook: edit_hook(sae, edits)}, n_continue=3))
    theirs = drive(sae_intervention_job(lm_llama, sae, text, edits, n_continue=3, hook=hook))
    np.testing.assert_allclose(ours.values, theirs.values, atol=1e-6)
    np.testing.assert_array_equal(ours.extras["continuation_after_ids"], theirs.extras["continuation_after_ids"])
    # a probe's direction steers like any other direction
    probe = drive(probe_job(lm_llama, [(t, "pos") for t in POSITIVE] + [(t, "neg") for t in NEGATIVE],
                            test_fraction=0.5))
    writes = steering_writes(probe.extras["directions"], "resid_post", 3.0, [1])
    r = drive(intervention_job(lm_llama, text, writes, n_continue=0))
    assert float(r.extras["kl"]) > 0
