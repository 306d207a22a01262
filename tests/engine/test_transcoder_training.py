"""Transcoder training: the streamed MLP rows against per-document forward passes, loss and explained variance
on the tiny GPT-2, the JumpReLU threshold's pseudo-gradient, exact folding of the training scales, cancel
keeping a loadable set, and a trained set driving an attribution graph that reproduces the real logits."""
import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.errors import JobCancelled, SAEError
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.sae import corpus as corpus_mod
from desktop_app.engine.sae.training import _JumpReLU, _Step
from desktop_app.engine.transcoder_training import (LayerTrainMetrics, MLPRowStream, TranscoderTrainConfig, _LayerFit,
                                                    corpus_documents,
                                                    train_transcoders, transcoder_training_job, write_set)
from desktop_app.engine.transcoders import load_transcoder_set, mlp_io

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(demo_task.corpus(300, seed=3)), encoding="utf-8")
    return path


def _docs(lm, path, max_tokens=200_000):
    return corpus_documents(lm, path, 64, max_tokens)


def _held_out_io(lm, n=40):
    """MLP inputs / outputs of unseen sentences, one plain forward pass per sentence (BOS dropped)."""
    ids = [torch.tensor([lm.tokenize(t, True).ids]) for t in demo_task.corpus(n, seed=99)]
    ins, outs = mlp_io(lm, ids)
    keep = torch.cat([torch.arange(i.shape[1]) > 0 for i in ids])
    return [x[keep] for x in ins], [y[keep] for y in outs]


def _ev(tc, x, y) -> float:
    with torch.no_grad():
        y = y.double()
        err = (tc(x).double() - y).pow(2).sum()
        return float(1 - err / (y - y.mean(0)).pow(2).sum())


def test_streamed_rows_are_the_mlp_rows_of_each_document(lm_gpt2, corpus_file):
    docs = _docs(lm_gpt2, corpus_file)[:10]
    stream = MLPRowStream(lm_gpt2, docs, [0, 1], buffer_tokens=10_000, gen=torch.Generator().manual_seed(0),
                          doc_batch=4)
    assert stream.fill(CancelToken())
    assert stream.epoch >= 1  # ten documents are fewer than the buffer: the corpus was read around
    specials = corpus_mod.special_ids(lm_gpt2)
    ref_in, ref_out = [[], []], [[], []]
    for doc in docs:  # unpadded, one document at a time
        ins, outs = mlp_io(lm_gpt2, [torch.tensor([doc])])
        keep = torch.tensor([t not in specials for t in doc])
        for L in range(2):
            ref_in[L].append(ins[L][keep])
            ref_out[L].append(outs[L][keep])
    n = sum(len(r) for r in ref_in[0])
    for L in range(2):
        torch.testing.assert_close(stream.x[L][:n], torch.cat(ref_in[L]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stream.y[L][:n], torch.cat(ref_out[L]), atol=1e-5, rtol=1e-5)
    # reading only layer 0 stops the forward pass there, with the same rows
    first = MLPRowStream(lm_gpt2, docs, [0], buffer_tokens=10_000, gen=torch.Generator().manual_seed(0), doc_batch=4)
    assert first.fill(CancelToken())
    assert torch.equal(first.x[0], stream.x[0]) and torch.equal(first.y[0], stream.y[0])
    # the buffer holds about buffer_tokens rows (at most one batch of documents more), never the whole corpus
    small = MLPRowStream(lm_gpt2, _docs(lm_gpt2, corpus_file), [0], buffer_tokens=100,
                         gen=torch.Generator().manual_seed(0), doc_batch=4)
    assert small.fill(CancelToken()) and 100 <= len(small.order) <= 100 + 4 * 64


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_training_reduces_the_loss_and_explains_the_mlp_output(lm_gpt2, corpus_file, architecture):
    cfg = TranscoderTrainConfig(architecture=architecture, d_transcoder=64, k=8, l0_coefficient=0.05, steps=300,
                                batch_size=256, lr=3e-3, log_every=25, buffer_tokens=4096)
    events = []
    result = drive(train_transcoders(lm_gpt2, _docs(lm_gpt2, corpus_file), cfg), events.append)
    curves = [e for e in events if isinstance(e, LayerTrainMetrics)]
    assert {m.layer for m in curves} == {0, 1} and not result.cancelled and result.steps_done == 300
    x, y = _held_out_io(lm_gpt2)
    for L in (0, 1):
        hist = result.history[L]
        assert [m.step for m in hist] == [1] + list(range(25, 301, 25))
        assert hist[-1].mse < 0.5 * hist[0].mse
        ev = _ev(result.tset.layers[L], x[L], y[L])
        assert ev > 0.85, (L, ev)  # measured: topk 0.921 / 0.918, jumprelu 0.962 / 0.965 (held-out sentences)
        l0 = float((result.tset.layers[L].encode(x[L]) != 0).sum(-1).float().mean())
        assert l0 <= 8 if architecture == "topk" else l0 < 40  # jumprelu: measured 28 / 29 of 64
    assert result.elapsed_s < 60


def test_jumprelu_threshold_pseudo_gradients():
    """d/dtheta of sum(H(pre - theta)) is the slope of its rectangle-kernel smoothing, which finite differences
    of clamp((pre - theta) / eps + 1/2, 0, 1) give exactly; JumpReLU's is -(theta / eps) K((pre - theta) / eps)
    times the incoming gradient (the pseudo-derivatives of Rajamanoharan et al. 2024, arXiv 2407.14435)."""
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    theta = torch.rand(6, generator=gen, dtype=torch.float64) * 0.5 + 0.1
    eps = 0.2
    t = theta.clone().requires_grad_()
    _Step.apply(pre, t, eps).sum().backward()

    def smoothed(th):
        return ((pre - th) / eps + 0.5).clamp(0, 1).sum(0)
    h = 1e-6
    for j in range(6):
        up, down = theta.clone(), theta.clone()
        up[j] += h
        down[j] -= h
        fd = float((smoothed(up)[j] - smoothed(down)[j]) / (2 * h))
        assert abs(float(t.grad[j]) - fd) < 1e-3 * max(1.0, abs(fd)), (j, float(t.grad[j]), fd)
        assert float(t.grad[j]) < 0
    upstream = torch.randn(200, 6, generator=gen, dtype=torch.float64)
    t2 = theta.clone().requires_grad_()
    p2 = pre.clone().requires_grad_()
    (_JumpReLU.apply(p2, t2, eps) * upstream).sum().backward()
    window = (((pre - theta) / eps).abs() < 0.5).double()
    np.testing.assert_allclose(t2.grad.numpy(), (-(theta / eps) * window * upstream).sum(0).numpy(), atol=1e-12)
    np.testing.assert_allclose(p2.grad.numpy(), ((pre > theta).double() * upstream).numpy(), atol=1e-12)


@pytest.mark.parametrize("architecture", ["topk", "jumprelu"])
def test_folding_the_training_scales_is_exact(architecture):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(300, 16, generator=gen) * 7.0, torch.randn(300, 16, generator=gen) * 0.3 + 1.0
    cfg = TranscoderTrainConfig(architecture=architecture, d_transcoder=24, k=4, skip=True, steps=5)
    fit = _LayerFit(cfg, 0, x, y, gen)
    with torch.no_grad():
        for p in fit.params.values():  # away from the initialisation, so every term counts
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
        _, _, _, _, y_hat_scaled = fit.loss(x * fit.sx, y * fit.sy, step=cfg.steps)
    tc = fit.transcoder()
    assert tc.W_skip is not None and tc.activation == architecture
    torch.testing.assert_close(tc(x), y_hat_scaled / fit.sy, atol=1e-5, rtol=1e-4)


def test_cancel_keeps_the_transcoders_so_far_as_a_loadable_set(lm_gpt2, corpus_file, tmp_path):
    cfg = TranscoderTrainConfig(architecture="jumprelu", d_transcoder=32, steps=1000, batch_size=64, log_every=5,
                                buffer_tokens=1024, skip=True)
    cancel = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, LayerTrainMetrics):
            seen.append(e)
            if len(seen) == 2 * 3:  # three logged points of both layers: steps 1, 5, 10
                cancel.cancel()
    result = drive(train_transcoders(lm_gpt2, _docs(lm_gpt2, corpus_file), cfg, cancel), on_event)
    assert result.cancelled and result.steps_done == 10
    folder = write_set(result.tset, tmp_path / "set", "gpt2", {"steps_done": result.steps_done})
    loaded = load_transcoder_set(folder, n_layers=2, d_model=lm_gpt2.info.d_model)
    x = _held_out_io(lm_gpt2, 5)[0]
    for L, (a, b) in enumerate(zip(result.tset.layers, loaded.layers)):
        for name in ("W_enc", "W_dec", "b_enc", "b_dec", "threshold", "W_skip"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a(x[L]), b(x[L]))

    # the kind's job: a cancel writes the set so far, and says where
    cancel = CancelToken()
    count = []

    def stop_after_first(e):
        if isinstance(e, LayerTrainMetrics):
            count.append(e)
            if len(count) == 2:
                cancel.cancel()
    out = tmp_path / "job"
    res = drive(transcoder_training_job(lm_gpt2, corpus_file, cfg, out, cancel=cancel, context=64), stop_after_first)
    assert res.status == "partial" and res.params["steps_done"] == 1 and str(out) in res.message
    assert load_transcoder_set(out, n_layers=2, d_model=lm_gpt2.info.d_model).layers[0].activation == "jumprelu"
    assert res.values.shape == (2, 1) and res.dims == ["layer", "step"]


def test_cancel_before_the_first_step_trains_nothing(lm_gpt2, corpus_file):
    cancel = CancelToken()
    cancel.cancel()
    with pytest.raises(JobCancelled):
        drive(train_transcoders(lm_gpt2, _docs(lm_gpt2, corpus_file), TranscoderTrainConfig(), cancel))


def test_a_trained_set_drives_a_graph_whose_replacement_reproduces_the_logits(lm_gpt2, corpus_file, tmp_path):
    from desktop_app.engine.attribution_graph import build_graph

    cfg = TranscoderTrainConfig(architecture="topk", d_transcoder=32, k=4, steps=80, batch_size=128, log_every=20,
                                lr=3e-3,
                                buffer_tokens=2048, skip=True)
    res = drive(transcoder_training_job(lm_gpt2, corpus_file, cfg, tmp_path / "set", context=64))
    assert res.status == "complete" and res.values.shape == (2, 5)  # steps 1, 20, 40, 60, 80
    assert np.all(res.extras["explained_variance"][:, -1] > 0.5)
    tset = load_transcoder_set(tmp_path / "set", n_layers=2, d_model=lm_gpt2.info.d_model)
    ids = torch.tensor([lm_gpt2.tokenize(PROMPT, True).ids])
    graph = drive(build_graph(lm_gpt2, ids, tset, max_feature_nodes=40, max_n_logits=3, desired_logit_prob=0.9))
    with torch.no_grad():
        plain = lm_gpt2.model(input_ids=ids).logits[0, -1].float().numpy()
    np.testing.assert_allclose(graph.replacement_logits, plain, atol=1e-5)


def test_training_some_layers_replaces_them_in_the_existing_set(lm_gpt2, corpus_file, tmp_path):
    out = tmp_path / "set"
    cfg = TranscoderTrainConfig(architecture="topk", d_transcoder=16, k=2, steps=5, batch_size=64,
                                buffer_tokens=512, layers=(1,))
    with pytest.raises(SAEError, match="replaces them in an existing set"):
        drive(transcoder_training_job(lm_gpt2, corpus_file, cfg, out, context=64))
    full = TranscoderTrainConfig(architecture="topk", d_transcoder=16, k=2, steps=5, batch_size=64, buffer_tokens=512)
    drive(transcoder_training_job(lm_gpt2, corpus_file, full, out, context=64))
    before = load_transcoder_set(out)
    res = drive(transcoder_training_job(lm_gpt2, corpus_file, TranscoderTrainConfig(
        architecture="topk", d_transcoder=16, k=2, steps=8, batch_size=64, buffer_tokens=512, seed=5, layers=(1,)),
        out, context=64))
    after = load_transcoder_set(out, n_layers=2)
    assert res.labels["layer"] == ["1"]
    assert torch.equal(before.layers[0].W_enc, after.layers[0].W_enc)
    assert not torch.equal(before.layers[1].W_enc, after.layers[1].W_enc)
    with pytest.raises(SAEError, match="one activation for all layers"):
        drive(transcoder_training_job(lm_gpt2, corpus_file, TranscoderTrainConfig(
            architecture="jumprelu", d_transcoder=16, steps=2, layers=(0,)), out, context=64))


def test_bad_settings_are_one_sentence(lm_gpt2, corpus_file, tmp_path):
    with pytest.raises(SAEError, match="topk, jumprelu"):
        TranscoderTrainConfig(architecture="relu")
    with pytest.raises(SAEError, match="k must be between"):
        TranscoderTrainConfig(d_transcoder=4, k=8)
    with pytest.raises(SAEError, match="do not exist"):
        drive(transcoder_training_job(lm_gpt2, corpus_file, TranscoderTrainConfig(layers=(5,)), tmp_path / "o"))
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SAEError, match="is not a transcoder set"):
        drive(transcoder_training_job(lm_gpt2, corpus_file, TranscoderTrainConfig(d_transcoder=8, k=2, steps=2),
                                      other, context=64))
    assert (other / "notes.txt").read_text() == "keep me"
