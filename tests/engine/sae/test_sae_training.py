"""Training on synthetic activations: sparse combinations of 64 random unit directions in d=32 (+ offset).

Stated targets: the TopK SAE (d_sae=128, k=8, 1000 steps) and the ReLU+L1 SAE (d_sae=128, 1000 steps)
reach explained variance > 0.9 on the training data, and the loss falls to under half its first value.
"""
import numpy as np
import pytest
import torch

from desktop_app.engine.jobs import CancelToken, Progress, drive
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.metrics import evaluate, explained_variance, l0, reconstruction_error
from desktop_app.engine.sae.training import TrainConfig, TrainMetrics, TrainResult, train_sae


@pytest.fixture(scope="module")
def acts():
    g = torch.Generator().manual_seed(1)
    n, d, m = 20_000, 32, 64
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    active = torch.rand(n, m, generator=g) < 3 / m
    mags = torch.rand(n, m, generator=g) * 2 + 0.5
    return (active * mags) @ dirs + 0.5


def run(acts, cfg, cancel=None, on_event=None):
    events = []
    result = drive(train_sae(acts, cfg, cancel), lambda e: (events.append(e), on_event and on_event(e)))
    return result, events


@pytest.mark.parametrize("arch,extra", [("topk", {"k": 8}), ("standard", {"l1_coefficient": 0.3})])
def test_training_reaches_explained_variance_and_reloads(acts, tmp_path, arch, extra):
    cfg = TrainConfig(architecture=arch, d_sae=128, steps=1000, batch_size=512, lr=3e-3, log_every=100,
                      hook_name="blocks.0.hook_resid_post", **extra)
    result, events = run(acts, cfg)
    assert isinstance(result, TrainResult) and not result.cancelled and result.steps_done == 1000
    metrics = [e for e in events if isinstance(e, TrainMetrics)]
    assert isinstance(events[0], Progress) and any(isinstance(e, Progress) for e in events[1:])
    assert metrics[0].step == 1 and metrics[-1].step == 1000
    assert metrics[-1].mse < 0.5 * metrics[0].mse
    ev = evaluate(result.sae, acts)
    assert ev["explained_variance"] > 0.9, ev
    if arch == "topk":
        assert ev["l0"] <= 8
    else:
        assert ev["l0"] < 64  # sparse: far below d_sae = 128
    saved = load_sae(save_saelens(result.sae, tmp_path / arch))
    assert saved.hook_name == "blocks.0.hook_resid_post"
    x = acts[:500]
    torch.testing.assert_close(saved(x)[0], result.sae(x)[0], rtol=0, atol=0)
    torch.testing.assert_close(saved.encode(x), result.sae.encode(x), rtol=0, atol=0)


def test_cancel_returns_the_sae_so_far(acts):
    cancel = CancelToken()
    cfg = TrainConfig(architecture="topk", d_sae=64, k=4, steps=10_000, batch_size=256, log_every=10)

    def on_event(event):
        if isinstance(event, TrainMetrics) and event.step >= 30:
            cancel.cancel()

    result, _ = run(acts, cfg, cancel, on_event)
    assert result.cancelled and 30 <= result.steps_done < 100
    x_hat, f = result.sae(acts[:100])
    assert x_hat.shape == (100, 32) and torch.isfinite(x_hat).all()


def test_metrics_against_numpy():
    rng = np.random.default_rng(0)
    x, x_hat = rng.normal(size=(50, 6)) + 2, rng.normal(size=(50, 6))
    err = ((x - x_hat) ** 2).sum(axis=1)
    total = (x ** 2).sum(axis=1).mean() - (x.mean(axis=0) ** 2).sum()
    xt, xht = torch.tensor(x), torch.tensor(x_hat)
    assert explained_variance(xt, xht) == pytest.approx(1 - err.mean() / total, rel=1e-6)
    np.testing.assert_allclose(reconstruction_error(xt, xht).numpy(), err, rtol=1e-6)
    assert explained_variance(xt, xt) == pytest.approx(1.0)
    assert l0(torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])) == pytest.approx(1.5)
