"""Training that scales: learning-rate schedule, BatchTopK and JumpReLU, checkpoints and exact resumption."""
import numpy as np
import pytest
import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, drive
from desktop_app.engine.sae.checkpoints import checkpoint_folders
from desktop_app.engine.sae.formats import load_sae, save_saelens
from desktop_app.engine.sae.metrics import evaluate
from desktop_app.engine.sae.training import TrainConfig, TrainMetrics, _JumpReLU, _Step, _lr_at, train_sae


@pytest.fixture(scope="module")
def acts():
    """Sparse combinations of 64 random unit directions in d=32, plus an offset."""
    g = torch.Generator().manual_seed(1)
    n, d, m = 12_000, 32, 64
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=-1, keepdim=True)
    active = torch.rand(n, m, generator=g) < 3 / m
    mags = torch.rand(n, m, generator=g) * 2 + 0.5
    return (active * mags) @ dirs + 0.5


def run(acts, cfg, cancel=None, on_event=None, **kw):
    return drive(train_sae(acts, cfg, cancel, **kw), on_event)


def same_sae(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


CONFIGS = {
    "topk": dict(k=4),
    "batchtopk": dict(k=4),
    "jumprelu": dict(l0_coefficient=0.05),
    "standard": dict(l1_coefficient=0.3, resample_every=20, dead_tokens=500),
}


@pytest.mark.parametrize("arch", list(CONFIGS))
def test_resumed_run_ends_where_an_uninterrupted_one_does(acts, tmp_path, arch):
    cfg = TrainConfig(architecture=arch, d_sae=48, steps=60, batch_size=128, lr=3e-3, log_every=10, seed=7,
                      lr_warmup_steps=5, checkpoint_every=20, **CONFIGS[arch])
    whole = run(acts, cfg, checkpoint_dir=tmp_path / "whole")
    assert [p.name for p in checkpoint_folders(tmp_path / "whole")] == ["ckpt-00000020", "ckpt-00000040"]

    cancel = CancelToken()
    stop = lambda e: cancel.cancel() if isinstance(e, TrainMetrics) and e.step >= 30 else None  # noqa: E731
    part = run(acts, cfg, cancel, stop, checkpoint_dir=tmp_path / "part")
    assert part.cancelled and part.steps_done == 30 and part.checkpoint.endswith("ckpt-00000030")
    resumed = run(acts, cfg, checkpoint_dir=tmp_path / "part", resume_from=tmp_path / "part")
    assert resumed.resumed_from == 30 and resumed.steps_done == 60 and not resumed.cancelled
    same_sae(resumed.sae, whole.sae)
    assert [m.step for m in resumed.history] == [m.step for m in whole.history]
    assert [m.loss for m in resumed.history] == [m.loss for m in whole.history]
    # and from an interval checkpoint of the uninterrupted run
    again = run(acts, cfg, resume_from=tmp_path / "whole" / "ckpt-00000020")
    same_sae(again.sae, whole.sae)


def test_resume_with_other_settings_is_refused(acts, tmp_path):
    cfg = TrainConfig(architecture="topk", d_sae=16, k=2, steps=20, batch_size=64, checkpoint_every=10)
    run(acts, cfg, checkpoint_dir=tmp_path)
    other = TrainConfig(architecture="topk", d_sae=16, k=3, steps=20, batch_size=64)
    with pytest.raises(SAEError) as err:
        run(acts, other, resume_from=tmp_path)
    assert str(err.value) == (f"The checkpoint {tmp_path / 'ckpt-00000010'} was made with k=2 but this run has "
                              "k=3; resume with the same settings or start a new run.")
    with pytest.raises(SAEError, match="holds no training checkpoint"):
        run(acts, cfg, resume_from=tmp_path / "nothing")


def test_learning_rate_warms_up_and_decays():
    cfg = TrainConfig(steps=100, lr=1.0, lr_warmup_steps=10, lr_decay_fraction=0.2)
    lrs = [_lr_at(s, cfg) for s in range(100)]
    np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)
    assert lrs[10:80] == [1.0] * 70
    np.testing.assert_allclose(lrs[80:], (100 - np.arange(80, 100)) / 20)


@pytest.mark.parametrize("arch,extra", [("batchtopk", {"k": 6}), ("jumprelu", {"l0_coefficient": 0.2, "jumprelu_init_threshold": 0.1})])
def test_batchtopk_and_jumprelu_learn_sparse_codes_and_save_as_jumprelu(acts, tmp_path, arch, extra):
    cfg = TrainConfig(architecture=arch, d_sae=128, steps=800, batch_size=512, lr=3e-3, log_every=100,
                      hook_name="blocks.0.hook_resid_post", **extra)
    result = run(acts, cfg)
    sae = result.sae
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.metadata["trained_architecture"] == arch
    ev = evaluate(sae, acts)
    assert ev["explained_variance"] > 0.85, ev
    if arch == "batchtopk":
        assert 3 <= ev["l0"] <= 12, ev  # one threshold for all features: L0 near k on average
        assert torch.unique(sae.threshold).numel() == 1 and float(sae.threshold[0]) > 0
    else:
        assert ev["l0"] < 12, ev
        assert not torch.allclose(sae.threshold, torch.full_like(sae.threshold, cfg.jumprelu_init_threshold))
    saved = load_sae(save_saelens(sae, tmp_path / arch))
    x = acts[:300]
    torch.testing.assert_close(saved.encode(x), sae.encode(x), rtol=1e-5, atol=1e-5)


def test_jumprelu_pseudo_derivatives_match_the_paper():
    """d/dtheta of sum(w * JumpReLU) = sum over the batch of -(theta/eps) K((pre-theta)/eps) w, and of the
    step function -(1/eps) K(...) w, K the rectangle |u| < 1/2; d/dpre = H(pre - theta) for JumpReLU, 0 for H."""
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(50, 6, generator=g, dtype=torch.float64) * 0.01 + 0.01
    theta = torch.full((6,), 0.01, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 6, generator=g, dtype=torch.float64)
    eps = 0.005
    pre_j = pre.clone().requires_grad_(True)
    (_JumpReLU.apply(pre_j, theta, eps) * w).sum().backward()
    p, t = pre.numpy(), 0.01
    k = (np.abs((p - t) / eps) < 0.5).astype(float)
    np.testing.assert_allclose(theta.grad.numpy(), (-(t / eps) * k * w.numpy()).sum(0), rtol=1e-12)
    np.testing.assert_allclose(pre_j.grad.numpy(), (p > t) * w.numpy(), rtol=1e-12)
    np.testing.assert_allclose(_JumpReLU.apply(pre, theta, eps).detach().numpy(), p * (p > t))
    theta.grad = None
    pre_s = pre.clone().requires_grad_(True)
    (_Step.apply(pre_s, theta, eps) * w).sum().backward()
    np.testing.assert_allclose(theta.grad.numpy(), (-(1 / eps) * k * w.numpy()).sum(0), rtol=1e-12)
    assert pre_s.grad is None or not pre_s.grad.any()


def test_training_inside_inference_mode_equals_training_outside(acts, tmp_path):
    """The window's worker runs every job in torch.inference_mode(); training switches autograd back on."""
    cfg = TrainConfig(architecture="jumprelu", d_sae=16, steps=15, batch_size=64, checkpoint_every=5)
    outside = run(acts, cfg)
    with torch.inference_mode():
        inside = run(acts, cfg, checkpoint_dir=tmp_path)
        again = run(acts, cfg, resume_from=tmp_path / "ckpt-00000010")
    same_sae(inside.sae, outside.sae)
    same_sae(again.sae, outside.sae)
