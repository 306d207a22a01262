"""Jacobian lens: the batched estimator against torch.autograd.functional.jacobian, the file format, the lens."""
import numpy as np
import pytest
import torch

from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.errors import SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jacobian_lens import (JacobianLens, fit_jacobian_lens_job, load_jacobian_lens,
                                              prompt_jacobians, save_jacobian_lens)
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.lenses import logit_lens_job

PROMPT = "When Mary and John went to the store, John gave a drink to"
TEXTS = [PROMPT, "Then Mary and John had a long day at the store, and John gave a drink to Mary"]


def _brute_force(lm, ids, layer, skip):
    """mean over source p >= skip of sum over targets p' of d h_final[p'] / d h_layer[p], by the full Jacobian."""
    n = lm.info.n_layers
    names = [hook_name(L, "resid_post") for L in range(n)]
    with torch.no_grad(), hooks(lm, read=[names[layer]]) as store:
        forward_logits(lm, torch.tensor([ids]))
    h0 = store[names[layer]][0].clone()

    def final_of(h):
        with hooks(lm, read=[names[-1]], write={names[layer]: lambda _a: h[None]}, keep_graph=True) as out:
            forward_logits(lm, torch.tensor([ids]))
        return out[names[-1]][0]
    jac = torch.autograd.functional.jacobian(final_of, h0)  # [pos', d, pos, d]
    return jac.sum(0).permute(1, 0, 2)[skip:].mean(0).double()  # [d_out, d_in]


@pytest.mark.parametrize("skip", [0, 3])
def test_batched_estimator_equals_the_brute_force_jacobian(tiny_lm, skip):
    ids = tiny_lm.tokenize(PROMPT).ids
    rows = prompt_jacobians(tiny_lm, ids, skip_first=skip, dim_batch=7)  # 7 does not divide d_model: a short chunk
    for L in range(tiny_lm.info.n_layers):
        ref = _brute_force(tiny_lm, ids, L, skip)
        torch.testing.assert_close(rows[L], ref, atol=1e-5, rtol=1e-5)
    eye = torch.eye(tiny_lm.info.d_model, dtype=torch.float64)
    torch.testing.assert_close(rows[tiny_lm.info.n_layers - 1], eye, atol=1e-6, rtol=0)
    assert (rows[0] - eye).abs().max() > 1e-3  # an early layer's Jacobian is not the identity


def test_fit_averages_prompts_and_the_lens_reads_through_j(lm_gpt2, tmp_path):
    out = tmp_path / "lens.pt"
    res = drive(fit_jacobian_lens_job(lm_gpt2, TEXTS, out, skip_first=2, dim_batch=16))
    assert res.status == "complete" and res.values.shape == (lm_gpt2.info.n_layers,)
    assert res.values[-1] < 1e-6 and res.values[0] > 1e-4
    per_prompt = [prompt_jacobians(lm_gpt2, lm_gpt2.tokenize(t).ids, skip_first=2) for t in TEXTS]
    lens = load_jacobian_lens(out, lm_gpt2)
    assert lens.n_prompts == 2 and lens.source_layers == list(range(lm_gpt2.info.n_layers))
    expected = (per_prompt[0][0] + per_prompt[1][0]) / 2
    torch.testing.assert_close(lens.jacobians[0].double(), expected, atol=1e-6, rtol=1e-5)

    tokens = lm_gpt2.tokenize(PROMPT)
    lens_res = drive(logit_lens_job(lm_gpt2, tokens, target="prediction", lens="jacobian", lens_path=out))
    logit_res = drive(logit_lens_job(lm_gpt2, tokens, target="prediction"))
    with torch.no_grad():
        out_hf = lm_gpt2.model(input_ids=torch.tensor([tokens.ids]), output_hidden_states=True)
    targets = torch.tensor(lens_res.extras["target_ids"])
    a = lm_gpt2.adapter
    h = out_hf.hidden_states[1][0]
    ref = torch.softmax(a.logits_from_resid(h @ lens.jacobians[0].T).float(), -1).gather(-1, targets[:, None])[:, 0]
    np.testing.assert_allclose(lens_res.values[0], ref.numpy(), atol=1e-5)
    # the last layer's J is the identity: its Jacobian lens is the logit lens, i.e. the model's own logits
    np.testing.assert_allclose(lens_res.values[-1], logit_res.values[-1], atol=1e-5)
    assert not np.allclose(lens_res.values[0], logit_res.values[0])


def test_save_load_round_trip_and_layers_without_a_matrix(lm_gpt2, tmp_path):
    d = lm_gpt2.info.d_model
    g = torch.Generator().manual_seed(0)
    lens = JacobianLens({0: torch.randn(d, d, generator=g)}, d, 5, {"n_layers": lm_gpt2.info.n_layers})
    path = save_jacobian_lens(lens, tmp_path / "j.pt")
    back = load_jacobian_lens(path, lm_gpt2)
    assert torch.equal(back.jacobians[0], lens.jacobians[0]) and back.n_prompts == 5 and back.source_layers == [0]
    res = drive(logit_lens_job(lm_gpt2, lm_gpt2.tokenize(PROMPT), target="prediction", lens="jacobian",
                               lens_path=path))
    assert np.isfinite(res.values).all() and not res.message
    last = lm_gpt2.info.n_layers - 1
    only_last = save_jacobian_lens(JacobianLens({last: torch.eye(d)}, d), tmp_path / "last.pt")
    res = drive(logit_lens_job(lm_gpt2, lm_gpt2.tokenize(PROMPT), target="prediction", lens="jacobian",
                               lens_path=only_last))
    assert np.isnan(res.values[:last]).all() and np.isfinite(res.values[last]).all()
    assert "no Jacobian for layers 0" in res.message


def test_tolerant_reader_layouts(lm_gpt2, tmp_path):
    d, n = lm_gpt2.info.d_model, lm_gpt2.info.n_layers
    eye = torch.eye(d)
    # the release's layout: "J" {layer: float16 [d, d]} for the source layers (the last one left out)
    torch.save({"J": {L: (2 * eye).half() for L in range(n - 1)}, "n_prompts": 1000, "d_model": d},
               tmp_path / "release.pt")
    lens = load_jacobian_lens(tmp_path / "release.pt", lm_gpt2)
    assert lens.source_layers == list(range(n - 1)) and lens.n_prompts == 1000
    assert lens.jacobians[0].dtype == torch.float32 and float(lens.jacobians[0][1, 1]) == 2.0
    assert sorted(torch.load(save_jacobian_lens(lens, tmp_path / "ours.pt"), weights_only=True)["J"]) == \
        list(range(n - 1))
    torch.save({"0": 2 * eye, "layer_1": 3 * eye}, tmp_path / "a.pt")
    lens = load_jacobian_lens(tmp_path / "a.pt", lm_gpt2)
    assert lens.source_layers == [0, 1] and float(lens.jacobians[1][0, 0]) == 3.0
    torch.save({"jacobians": torch.stack([eye] * n), "d_model": d}, tmp_path / "b.pt")
    assert load_jacobian_lens(tmp_path / "b.pt", lm_gpt2).source_layers == list(range(n))
    torch.save({"weights": eye, "other": 1}, tmp_path / "c.pt")
    with pytest.raises(SpecError, match="keys found: 'weights', 'other'"):
        load_jacobian_lens(tmp_path / "c.pt", lm_gpt2)


def test_wrong_width_or_depth_is_refused(lm_gpt2, tmp_path):
    d, n = lm_gpt2.info.d_model, lm_gpt2.info.n_layers
    save_jacobian_lens(JacobianLens({0: torch.eye(d + 1)}, d + 1), tmp_path / "wide.pt")
    with pytest.raises(SpecError, match=f"d_model {d + 1}.*d_model {d} and {n} layers"):
        load_jacobian_lens(tmp_path / "wide.pt", lm_gpt2)
    save_jacobian_lens(JacobianLens({n: torch.eye(d)}, d), tmp_path / "deep.pt")
    with pytest.raises(SpecError, match="layers"):
        load_jacobian_lens(tmp_path / "deep.pt", lm_gpt2)
    with pytest.raises(SpecError, match="is not a file"):
        load_jacobian_lens(tmp_path / "missing.pt", lm_gpt2)
    bad = torch.eye(d)
    bad[2, 2] = float("inf")
    save_jacobian_lens(JacobianLens({0: bad}, d), tmp_path / "inf.pt")
    with pytest.raises(SpecError, match="1 NaN or infinite values in J of layer 0"):
        load_jacobian_lens(tmp_path / "inf.pt", lm_gpt2)


class _Payload:  # any pickled object: weights_only refuses to build it
    pass


def test_a_file_with_pickled_objects_is_refused(lm_gpt2, tmp_path):
    d = lm_gpt2.info.d_model
    torch.save({"J": {0: torch.eye(d)}, "extra": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(SpecError, match="pickled objects"):
        load_jacobian_lens(tmp_path / "evil.pt", lm_gpt2)


def test_cancel_saves_the_prompts_finished(lm_gpt2, tmp_path):
    cancel = CancelToken()

    def on_event(_ev):
        cancel.cancel()
    res = drive(fit_jacobian_lens_job(lm_gpt2, TEXTS, tmp_path / "p.pt", skip_first=2, cancel=cancel), on_event)
    assert res.status == "partial" and "1 of 2" in res.message
    assert load_jacobian_lens(tmp_path / "p.pt", lm_gpt2).n_prompts == 1
    with pytest.raises(SpecError, match="longer than 40"):
        drive(fit_jacobian_lens_job(lm_gpt2, ["short text"], tmp_path / "q.pt", skip_first=40))


def test_damaged_or_foreign_files_get_one_sentence(lm_gpt2, tmp_path):
    d = lm_gpt2.info.d_model
    good = save_jacobian_lens(JacobianLens({0: torch.eye(d)}, d), tmp_path / "good.pt").read_bytes()
    for cut in (0, 10, len(good) // 2, len(good) - 5):
        (tmp_path / "cut.pt").write_bytes(good[:cut])
        with pytest.raises(SpecError, match="could not be read"):
            load_jacobian_lens(tmp_path / "cut.pt", lm_gpt2)
    torch.save(torch.eye(d), tmp_path / "tensor.pt")
    with pytest.raises(SpecError, match="holds a Tensor"):
        load_jacobian_lens(tmp_path / "tensor.pt", lm_gpt2)
    torch.save({"J": {0: "not a matrix"}}, tmp_path / "text.pt")
    with pytest.raises(SpecError, match="keys found: 0"):
        load_jacobian_lens(tmp_path / "text.pt", lm_gpt2)
