"""Decoders left in their safetensors files: rows read on demand equal the stored rows, a graph reads only the rows
of its active features (never a whole decoder) and equals the graph of the same set held in memory."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from desktop_app.engine.attribution_graph import build_graph
from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import drive
from desktop_app.engine.transcoders import (DecoderRows, Transcoder, TranscoderSet, load_transcoder_set,
                                            save_transcoder_set)

PROMPT = "When Mary and John went to the store, John gave a drink to"
WIDTH, K = 4096, 4


def _wide_set(lm, folder, seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = lm.info.d_model
    layers = [Transcoder(torch.randn(WIDTH, d, generator=gen) / d ** 0.5, torch.randn(WIDTH, d, generator=gen) * 0.1,
                         torch.randn(WIDTH, generator=gen) * 0.01, torch.randn(d, generator=gen) * 0.01, "topk", None, K)
              for _ in range(lm.info.n_layers)]
    return save_transcoder_set(TranscoderSet(layers, {}), folder)


def test_decoder_rows_equal_the_stored_rows(lm_gpt2, tmp_path):
    folder = _wide_set(lm_gpt2, tmp_path / "set")
    lazy = load_transcoder_set(folder)
    eager = load_transcoder_set(folder, lazy_decoders=False)
    assert not any(tc.decoder_loaded for tc in lazy.layers) and all(tc.decoder_loaded for tc in eager.layers)
    idx = [7, 3, 4, 5, 4095, 0, 7, 6, 100]  # unordered, repeated, runs, both ends
    for L in range(len(lazy)):
        assert torch.equal(lazy.decoder_rows(L, idx), eager.layers[L].W_dec[idx])
        assert torch.equal(eager.decoder_rows(L, idx), eager.layers[L].W_dec[idx])
    x = torch.randn(6, lm_gpt2.info.d_model)
    torch.testing.assert_close(lazy.layers[0](x), eager.layers[0](x), rtol=1e-6, atol=1e-6)
    assert not lazy.layers[0].decoder_loaded  # decoding read only the active rows
    with pytest.raises(SAEError, match="out of range"):
        lazy.decoder_rows(0, [WIDTH])
    # the property still gives the whole matrix (read once, then kept)
    assert torch.equal(lazy.layers[1].W_dec, eager.layers[1].W_dec) and lazy.layers[1].decoder_loaded


def test_a_decoder_changed_on_disk_is_refused(lm_gpt2, tmp_path):
    folder = _wide_set(lm_gpt2, tmp_path / "set")
    lazy = load_transcoder_set(folder)
    d = lm_gpt2.info.d_model
    save_file({"W_enc": torch.zeros(8, d), "W_dec": torch.zeros(8, d), "b_enc": torch.zeros(8),
               "b_dec": torch.zeros(d)}, str(folder / "layer_0.safetensors"))
    with pytest.raises(SAEError, match="changed on disk"):
        lazy.decoder_rows(0, [1])
    assert isinstance(lazy.layers[1]._W_dec, DecoderRows)
    (folder / "layer_1.safetensors").unlink()
    with pytest.raises(SAEError, match="could not be read again"):
        lazy.decoder_rows(1, [1])


def test_a_graph_reads_only_its_active_decoder_rows(lm_gpt2, tmp_path, monkeypatch):
    lm = lm_gpt2
    folder = _wide_set(lm, tmp_path / "set")
    lazy, eager = load_transcoder_set(folder), load_transcoder_set(folder, lazy_decoders=False)
    read = []
    original = DecoderRows.rows
    monkeypatch.setattr(DecoderRows, "rows", lambda self, idx: read.append(len(idx)) or original(self, idx))
    ids = torch.tensor([lm.tokenize(PROMPT, True).ids])
    g_lazy = drive(build_graph(lm, ids, lazy, max_n_logits=3))
    monkeypatch.setattr(DecoderRows, "rows", original)
    g_eager = drive(build_graph(lm, ids, eager, max_n_logits=3))
    n_pos = ids.shape[1]
    assert not any(tc.decoder_loaded for tc in lazy.layers)
    # the whole graph read at most k rows per position and layer (once for the graph, once for the replacement
    # check), out of WIDTH per layer
    assert 0 < sum(read) <= 2 * lm.info.n_layers * n_pos * K < WIDTH
    assert g_lazy.node_kind == g_eager.node_kind and (g_lazy.node_feature == g_eager.node_feature).all()
    np.testing.assert_allclose(g_lazy.adjacency, g_eager.adjacency, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_lazy.bias, g_eager.bias, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_lazy.replacement_logits, g_lazy.real_logits[-1], atol=1e-5)


def test_a_clamp_check_reads_only_the_clamped_decoder_rows(lm_gpt2, tmp_path):
    from desktop_app.engine.graph_check import measure_clamps

    lm = lm_gpt2
    folder = _wide_set(lm, tmp_path / "set")
    lazy, eager = load_transcoder_set(folder), load_transcoder_set(folder, lazy_decoders=False)
    ids = lm.tokenize(PROMPT, True).ids
    clamps = [(0, 2, 17, 1.5), (1, len(ids) - 1, 4000, -0.5)]
    got = measure_clamps(lm, ids, lazy, clamps, [5, 9, 11])
    want = measure_clamps(lm, ids, eager, clamps, [5, 9, 11])
    assert not any(tc.decoder_loaded for tc in lazy.layers)
    for name in ("measured_graph", "measured_frozen", "measured_real"):
        assert np.abs(want[name]).max() > 1e-4  # the clamps change the logits
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)
