"""SAE jobs on the tiny GPT-2 (d_model 32): checked against numpy encodings of activations captured directly
and against one hand-hooked forward pass per cell."""
import json

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.capture import hooks, run_with_cache
from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.prompts import prepare_pair
from desktop_app.engine.sae.corpus import read_corpus
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.inspect import FeatureEdit
from desktop_app.engine.sae.jobs import (metrics_dict, sae_feature_patching_job, sae_features_job,
                                         sae_intervention_job, sae_metrics_job, sae_training_job)
from desktop_app.engine.sae.model import SAE, SAEConfig
from desktop_app.engine.sae.training import TrainConfig

D = 32
HOOK = "blocks.1.hook_resid_pre"
TEXT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls: a second intra-op thread only adds spin-waiting on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


def random_sae(d_in=D, d_sae=64, seed=0, hook=HOOK):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name=hook))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory):
    return save_saelens(random_sae(), tmp_path_factory.mktemp("sae") / "random")


def numpy_encode(folder, x):
    """relu((x - b_dec) W_enc + b_enc) and its reconstruction, from the saved file (standard SAE)."""
    from safetensors.numpy import load_file
    w = load_file(str(folder / "sae_weights.safetensors"))
    f = np.maximum((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"], 0.0)
    return f, f @ w["W_dec"] + w["b_dec"]


def captured(lm, text, hook=HOOK):
    ids = lm.tokenize(text).ids
    _, cache = run_with_cache(lm, [ids], [hook])
    return ids, cache[hook][0].numpy().astype(np.float64)


def test_features_equal_direct_computation(lm, sae_dir):
    r = drive(sae_features_job(lm, TEXT, sae_dir, top_k=0))
    ids, x = captured(lm, TEXT)
    f, x_hat = numpy_encode(sae_dir, x)
    assert r.kind == "sae_features" and r.dims == ["position", "feature"]
    np.testing.assert_allclose(r.values, f, rtol=1e-5, atol=1e-5)
    assert r.labels["feature"] == [str(i) for i in range(64)]
    assert r.labels["position"] == lm.tokenize(TEXT).labels()
    assert list(r.tokens_clean) == ids
    np.testing.assert_allclose(r.extras["reconstruction_error"], ((x - x_hat) ** 2).sum(-1), rtol=1e-4)
    np.testing.assert_array_equal(r.extras["l0"], (f > 0).sum(-1))
    assert r.params["hook"] == HOOK and r.status == "complete"


def test_top_k_is_the_union_of_each_positions_top_k(lm, sae_dir):
    r = drive(sae_features_job(lm, TEXT, sae_dir, top_k=3))
    _, x = captured(lm, TEXT)
    f, _ = numpy_encode(sae_dir, x)
    union = set()
    for row in f:
        union |= {int(i) for i in np.argsort(-row)[:3] if row[i] > 0}
    assert r.labels["feature"] == [str(i) for i in sorted(union)]
    np.testing.assert_allclose(r.values, f[:, sorted(union)], rtol=1e-5, atol=1e-5)


def test_width_mismatch_names_both_widths(lm, tmp_path):
    folder = save_saelens(random_sae(d_in=48), tmp_path / "wide")
    with pytest.raises(SAEError) as err:
        drive(sae_features_job(lm, TEXT, folder))
    assert "48" in str(err.value) and "32" in str(err.value)


def test_hook_z_sae_reads_flattened_heads(lm, tmp_path):
    hook = "blocks.0.attn.hook_z"
    folder = save_saelens(random_sae(hook=hook, seed=3), tmp_path / "z")
    r = drive(sae_features_job(lm, TEXT, folder, top_k=0))
    _, z = captured(lm, TEXT, hook)
    f, _ = numpy_encode(folder, z.reshape(z.shape[0], -1))
    np.testing.assert_allclose(r.values, f, rtol=1e-5, atol=1e-5)


def test_corpus_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n")
    with pytest.raises(SAEError, match="contains no text"):
        read_corpus(empty)
    with pytest.raises(SAEError, match="does not exist"):
        read_corpus(tmp_path / "missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(SAEError, match="Line 2"):
        read_corpus(bad)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "a b"}) + "\n\n" + json.dumps({"text": "c"}) + "\n")
    assert read_corpus(good) == ["a b", "c"]
    paras = tmp_path / "p.txt"
    paras.write_text("one\ntwo\n\nthree\n")
    assert read_corpus(paras) == ["one\ntwo", "three"]
    lines = tmp_path / "l.txt"
    lines.write_text("one\ntwo\nthree\n")
    assert read_corpus(lines) == ["one", "two", "three"]


def test_training_job_on_empty_corpus_says_so(lm, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SAEError, match="contains no text"):
        drive(sae_training_job(lm, HOOK, empty, TrainConfig(steps=5), tmp_path / "out"))


def test_intervention_without_edits_changes_nothing_and_ablation_does(lm, sae_dir):
    r0 = drive(sae_intervention_job(lm, sae_dir, TEXT, [], n_continue=4))
    np.testing.assert_allclose(r0.values[0], r0.values[1], atol=1e-5)
    np.testing.assert_array_equal(r0.extras["top_token_ids"][0], r0.extras["top_token_ids"][1])
    assert r0.extras["continuation"][0] == r0.extras["continuation"][1]
    assert r0.extras["top_tokens"].dtype.kind == "U" and r0.extras["continuation"].dtype.kind == "U"
    assert abs(float(r0.extras["kl"])) < 1e-6
    # reference: the plain model's next-token distribution
    logits, _ = run_with_cache(lm, [lm.tokenize(TEXT).ids], [])
    probs = torch.softmax(logits[0, -1], -1)
    np.testing.assert_allclose(r0.values[0], probs.topk(10).values.numpy(), atol=1e-6)

    _, x = captured(lm, TEXT)
    f, _ = numpy_encode(sae_dir, x)
    feature = int(np.argmax(f[-1]))
    r1 = drive(sae_intervention_job(lm, sae_dir, TEXT, [FeatureEdit(feature, "ablate")], n_continue=2))
    assert float(r1.extras["kl"]) > 1e-6
    assert not np.allclose(r1.values[0], r1.values[1], atol=1e-6)
    assert r1.params["edits"][0]["feature"] == feature
    # without the error term and without edits: the SAE's reconstruction replaces the activation
    r2 = drive(sae_intervention_job(lm, sae_dir, TEXT, [], keep_error=False, n_continue=0))
    assert float(r2.extras["kl"]) > 1e-6


def test_feature_patching_matches_one_forward_per_feature(lm, sae_dir):
    ex = demo_task.ioi_examples(1, seed=1)[0]
    pair = prepare_pair(lm, ex.clean, ex.corrupted, ex.answer, ex.wrong)
    r = drive(sae_feature_patching_job(lm, pair, sae_dir, batch_size=7))
    _, xc = captured(lm, ex.clean)
    _, xk = captured(lm, ex.corrupted)
    fc, _ = numpy_encode(sae_dir, xc)
    fk, _ = numpy_encode(sae_dir, xk)
    active = sorted(set(np.nonzero((fc > 0).any(0) | (fk > 0).any(0))[0].tolist()))
    assert r.labels["feature"] == [str(i) for i in active] and r.dims == ["feature"]
    w_dec = load_sae(sae_dir).W_dec

    def ld(write=None):
        ids = torch.tensor([pair.corrupted.ids])
        with torch.no_grad(), hooks(lm, write=write or {}):
            out = lm.model(input_ids=ids).logits[0, -1]
        return float(out[pair.answer_id] - out[pair.wrong_id])

    ids_c = torch.tensor([pair.clean.ids])
    with torch.no_grad():
        lc = lm.model(input_ids=ids_c).logits[0, -1]
    ld_clean, ld_corr = float(lc[pair.answer_id] - lc[pair.wrong_id]), ld()
    for col in (0, len(active) // 2, len(active) - 1):
        i = active[col]
        delta = torch.tensor(fc[:, i] - fk[:, i], dtype=torch.float32)[:, None] * w_dec[i]
        patched = ld({HOOK: lambda a, d=delta: a + d})
        expected = (patched - ld_corr) / (ld_clean - ld_corr)
        assert abs(r.values[col] - expected) < 1e-4
    each = drive(sae_feature_patching_job(lm, pair, sae_dir, positions="each"))
    assert each.values.shape == (pair.n_pos, len(active)) and np.isfinite(each.values).all()


def test_metrics_of_an_exact_sae(lm):
    eye = torch.eye(D)
    sae = SAE(SAEConfig(architecture="standard", d_in=D, d_sae=2 * D, hook_name=HOOK, apply_b_dec_to_input=False))
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
    m = metrics_dict(drive(sae_metrics_job(lm, sae, [TEXT, "Mary gave a drink to John"])))
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert m["ce_spliced"] == pytest.approx(m["ce_clean"], abs=1e-4)
    assert m["kl_spliced"] == pytest.approx(0.0, abs=1e-5)
    assert m["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert m["ce_zero_ablated"] != pytest.approx(m["ce_clean"], abs=1e-3)


def test_training_job_lowers_loss_and_writes_a_loadable_sae(lm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(300, seed=2)))
    cfg = TrainConfig(architecture="topk", d_sae=64, k=8, steps=120, batch_size=256, log_every=20)
    events = []
    r = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "out"), events.append)
    loss = r.values[:, r.labels["metric"].index("loss")]
    assert r.status == "complete" and r.dims == ["step", "metric"] and loss[-1] < 0.7 * loss[0]
    assert any(type(e).__name__ == "TrainMetrics" for e in events)
    back = load_sae(tmp_path / "out")
    assert back.hook_name == HOOK and back.d_sae == 64 and back.cfg.architecture == "topk"
    assert back.log_sparsity is not None and back.log_sparsity.shape == (64,)
    # the saved SAE reconstructs the model's activations as the training curve says
    _, x = captured(lm, demo_task.corpus(3, seed=9)[0])
    x = torch.tensor(x, dtype=torch.float32)
    ev = 1 - ((back(x)[0] - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert float(ev) > 0.3


def test_training_cancel_still_writes_the_sae(lm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(40, seed=3)))
    cancel = CancelToken()

    def on_event(e):
        if type(e).__name__ == "TrainMetrics" and e.step >= 10:
            cancel.cancel()

    cfg = TrainConfig(architecture="topk", d_sae=32, k=4, steps=500, batch_size=64, log_every=10)
    r = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "out", cancel=cancel), on_event)
    assert r.status == "partial" and int(r.params["steps_done"]) < 500
    assert load_sae(tmp_path / "out").d_sae == 32
