"""When SAELens itself is installed: folders it writes load here, and our activations equal its encode."""
import numpy as np
import pytest
import torch

from desktop_app.engine.sae.formats import load_sae

sae_lens = pytest.importorskip("sae_lens")


def _randomise(sae, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g) * 0.2)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_saelens_written_folder_encodes_identically(arch, tmp_path):
    cls, cfg_cls = {"standard": ("StandardSAE", "StandardSAEConfig"), "topk": ("TopKSAE", "TopKSAEConfig"),
                    "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig")}[arch]
    extra = {"k": 4} if arch == "topk" else {}
    cfg = getattr(sae_lens, cfg_cls)(d_in=16, d_sae=40, **extra)
    cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    theirs = getattr(sae_lens, cls)(cfg)
    _randomise(theirs, seed=3)
    theirs.save_model(str(tmp_path / "sae"))
    ours = load_sae(tmp_path / "sae")
    assert ours.hook_name == "blocks.1.hook_resid_post"
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = theirs.encode(x).numpy()
        got = ours.encode(x).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(ours.decode(torch.as_tensor(got)).numpy(),
                                   theirs.decode(torch.as_tensor(expected)).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch,extra", [("topk", {"k": 4}), ("batchtopk", {"k": 4}),
                                        ("jumprelu", {"jumprelu_init_threshold": 0.1})])
def test_saelens_reads_folders_our_trainer_writes(arch, extra, tmp_path):
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.training import TrainConfig, train_sae

    x = torch.randn(2000, 16, generator=torch.Generator().manual_seed(5)) + 0.3
    cfg = TrainConfig(architecture=arch, d_sae=40, steps=50, batch_size=256, hook_name="blocks.1.hook_resid_post",
                      **extra)
    ours = drive(train_sae(x, cfg)).sae
    ours.cfg.metadata.update(model_name="tiny", context_size=16)
    folder = save_saelens(ours, tmp_path / arch)
    theirs = sae_lens.SAE.load_from_disk(str(folder), device="cpu")
    assert theirs.cfg.metadata.hook_name == "blocks.1.hook_resid_post"
    assert theirs.cfg.metadata.context_size == 16 and theirs.cfg.metadata.model_name == "tiny"
    with torch.no_grad():
        np.testing.assert_allclose(theirs.encode(x[:64]).numpy(), ours.encode(x[:64]).numpy(), atol=1e-5)
