"""Logit lens and tuned lens against plain forward passes with output_hidden_states."""
import json

import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.lenses import logit_lens_job
from desktop_app.engine.loading import load_model
from desktop_app.engine.tuned_lens import TunedLens, load_tuned_lens, save_tuned_lens, train_tuned_lens_job

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _hidden(lm, ids):
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.logits[0].float(), out.hidden_states


def test_last_layer_lens_equals_the_model_logits_and_middle_layers_match(tiny_lm):
    tokens = tiny_lm.tokenize(PROMPT)
    answer = tiny_lm.single_token_id(" Mary")
    res = drive(logit_lens_job(tiny_lm, tokens, target="answer", answer_id=answer, k=3))
    logits, hidden = _hidden(tiny_lm, tokens.ids)
    probs = torch.softmax(logits, -1)
    assert res.status == "complete" and res.dims == ["layer", "position"]
    assert res.values.shape == (tiny_lm.info.n_layers, len(tokens.ids))
    np.testing.assert_allclose(res.values[-1], probs[:, answer].numpy(), atol=1e-5)
    top_p, top_i = probs.topk(3, -1)
    np.testing.assert_array_equal(res.extras["top_token_ids"][-1], top_i.numpy())
    np.testing.assert_allclose(res.extras["top_token_probs"][-1], top_p.numpy(), atol=1e-5)
    # hidden_states[L + 1] is the output of block L (the last one has the final norm applied in some families)
    a = tiny_lm.adapter
    for L in range(tiny_lm.info.n_layers - 1):
        ref = torch.softmax(a.unembed(a.final_norm(hidden[L + 1][0])).float(), -1)[:, answer]
        np.testing.assert_allclose(res.values[L], ref.numpy(), atol=1e-5)
    rank = (torch.softmax(logits, -1) > probs[:, answer:answer + 1]).sum(-1)
    np.testing.assert_array_equal(res.extras["target_rank"][-1], rank.numpy())
    assert res.labels["position"][1].startswith("1: ")
    top = int(res.extras["top_token_ids"][-1, -1, 0])
    assert res.extras["top_token_text"][-1, -1, 0] == tiny_lm.tokens_of_ids([top]).display[0]


def test_prediction_target_is_the_final_top_token(lm_gpt2):
    tokens = lm_gpt2.tokenize(PROMPT)
    res = drive(logit_lens_job(lm_gpt2, tokens, target="prediction"))
    logits, _ = _hidden(lm_gpt2, tokens.ids)
    np.testing.assert_array_equal(res.extras["target_ids"], logits.argmax(-1).numpy())
    np.testing.assert_allclose(res.values[-1], torch.softmax(logits, -1).max(-1).values.numpy(), atol=1e-5)
    assert (res.extras["target_rank"][-1] == 0).all()


def test_literal_target_and_bad_targets(lm_gpt2):
    tokens = lm_gpt2.tokenize(PROMPT)
    res = drive(logit_lens_job(lm_gpt2, tokens, target=" John"))
    assert (res.extras["target_ids"] == lm_gpt2.single_token_id(" John")).all()
    with pytest.raises(SpecError):
        drive(logit_lens_job(lm_gpt2, tokens, lens="jacobian"))
    with pytest.raises(SpecError):
        drive(logit_lens_job(lm_gpt2, tokens, target="answer", answer_id=None))


def test_cancel_keeps_finished_layers(lm_gpt2):
    tokens = lm_gpt2.tokenize(PROMPT)
    cancel = CancelToken()
    job = logit_lens_job(lm_gpt2, tokens, target="prediction", cancel=cancel)
    seen = []

    def on_event(ev):
        seen.append(ev)
        if type(ev).__name__ == "Partial":
            cancel.cancel()
    res = drive(job, on_event)
    assert res.status == "partial"
    assert np.isfinite(res.values[0]).all() and np.isnan(res.values[1]).all()


def _random_lens(lm, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d = lm.info.n_layers, lm.info.d_model
    config = dict(base_model_name_or_path=str(lm.path), d_model=d, num_hidden_layers=n, bias=True, lens_type="linear_tuned_lens")
    return TunedLens(0.1 * torch.randn(n, d, d, generator=g), 0.1 * torch.randn(n, d, generator=g), config)


def test_tuned_lens_folder_round_trip_and_job_matches_manual_translation(lm_llama, tmp_path):
    lens = _random_lens(lm_llama)
    folder = save_tuned_lens(lens, tmp_path / "lens")
    state = torch.load(folder / "params.pt", weights_only=True)
    assert sorted(state) == sorted(f"{i}.{w}" for i in range(lm_llama.info.n_layers) for w in ("weight", "bias"))
    assert json.loads((folder / "config.json").read_text())["num_hidden_layers"] == lm_llama.info.n_layers
    loaded = load_tuned_lens(folder, lm_llama)
    assert torch.equal(loaded.weights, lens.weights)
    tokens = lm_llama.tokenize(PROMPT)
    res = drive(logit_lens_job(lm_llama, tokens, target="prediction", lens="tuned", lens_path=folder))
    logits, hidden = _hidden(lm_llama, tokens.ids)
    targets = torch.tensor(res.extras["target_ids"])
    a = lm_llama.adapter
    h = hidden[1][0]  # output of block 0 -> translator 1 (the input of block 1)
    t = h + h @ lens.weights[1].T + lens.biases[1]
    ref = torch.softmax(a.unembed(a.final_norm(t)).float(), -1).gather(-1, targets[:, None])[:, 0]
    np.testing.assert_allclose(res.values[0], ref.numpy(), atol=1e-5)
    np.testing.assert_allclose(res.values[-1], torch.softmax(logits, -1).max(-1).values.numpy(), atol=1e-5)


def test_tuned_lens_refuses_a_lens_of_another_shape(lm_gpt2, lm_llama, tmp_path):
    folder = save_tuned_lens(_random_lens(lm_llama), tmp_path / "llama_lens")
    with pytest.raises(SpecError, match="d_model"):
        load_tuned_lens(folder, lm_gpt2)
    with pytest.raises(SpecError, match="not a tuned-lens folder"):
        load_tuned_lens(tmp_path, lm_gpt2)
    (folder / "params.pt").write_bytes(b"not a torch file")
    with pytest.raises(SpecError, match="could not be read"):
        load_tuned_lens(folder, lm_llama)


def test_tuned_lens_with_nan_or_a_broken_config_is_refused(lm_llama, tmp_path):
    lens = _random_lens(lm_llama)
    lens.biases[1, 3] = float("nan")
    folder = save_tuned_lens(lens, tmp_path / "nan_lens")
    with pytest.raises(SpecError, match=r"1 NaN or infinite values in 1\.bias"):
        load_tuned_lens(folder, lm_llama)
    (folder / "config.json").write_text('{"d_model": 64,')
    with pytest.raises(SpecError, match="config.json is not valid JSON .*line 1"):
        load_tuned_lens(folder, lm_llama)


def test_training_a_tuned_lens_lowers_the_kl_and_saves_a_loadable_folder(stories_dir, tmp_path):
    lm = load_model(stories_dir, dtype="float32", device="cpu")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([
        "Once upon a time, there was a little girl named Lily. She loved to play outside.",
        "One day, a big dog came to the park. The dog was happy and wanted to play.",
        "Tom had a red ball. He liked to throw it to his friend Sam.",
        "The sun was hot, so the cat slept under the tree all day.",
    ]))
    res = drive(train_tuned_lens_job(lm, corpus, tmp_path / "tl", steps=40, context=32, batch_size=4, lr=3e-3))
    assert res.values[-5:].mean() < 0.8 * res.values[:3].mean()
    lens = load_tuned_lens(tmp_path / "tl", lm)
    assert lens.weights.abs().sum() > 0


def test_cancelled_training_saves_the_lens_so_far(lm_gpt2, tmp_path):
    cancel = CancelToken()

    def on_event(ev):
        cancel.cancel()
    texts = ["When Mary and John went to the store", "John gave a drink to Mary"]
    res = drive(train_tuned_lens_job(lm_gpt2, texts, tmp_path / "tl", steps=50, cancel=cancel), on_event)
    assert res.status == "partial" and np.isfinite(res.values[0]) and np.isnan(res.values[-1])
    assert load_tuned_lens(tmp_path / "tl", lm_gpt2).n_layers == lm_gpt2.info.n_layers
