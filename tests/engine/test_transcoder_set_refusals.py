"""A damaged circuit-tracer transcoder set is refused in one sentence when opened (or, for a decoder left in its
file, when its rows are read), never used to compute NaN graphs."""
import pytest
import torch
from safetensors.torch import save_file

from desktop_app.engine.errors import SAEError
from desktop_app.engine.transcoders import Transcoder, TranscoderSet, load_transcoder_set, save_transcoder_set

D, W = 8, 16


def _set(folder, activation="relu"):
    gen = torch.Generator().manual_seed(0)
    layers = [Transcoder(torch.randn(W, D, generator=gen), torch.randn(W, D, generator=gen), torch.zeros(W),
                         torch.zeros(D), activation, torch.full((W,), 0.1) if activation == "jumprelu" else None)
              for _ in range(2)]
    return save_transcoder_set(TranscoderSet(layers, {}), folder)


def _edit(path, **changes):
    from safetensors.torch import load_file

    t = load_file(str(path))
    for name, value in changes.items():
        if value is None:
            t.pop(name)
        else:
            t[name] = value
    save_file(t, str(path))


def test_non_finite_encoder_is_refused(tmp_path):
    folder = _set(tmp_path / "s")
    w = torch.randn(W, D)
    w[3, 2] = float("nan")
    _edit(folder / "layer_1.safetensors", W_enc=w)
    with pytest.raises(SAEError, match=r"layer 1 .* 1 NaN or infinite values in W_enc"):
        load_transcoder_set(folder)


def test_non_finite_lazy_decoder_rows_are_refused(tmp_path):
    folder = _set(tmp_path / "s")
    w = torch.randn(W, D)
    w[5, 0] = float("inf")
    _edit(folder / "layer_0.safetensors", W_dec=w)
    lazy = load_transcoder_set(folder)
    assert torch.isfinite(lazy.decoder_rows(0, [4, 6])).all()  # rows without them still read
    with pytest.raises(SAEError, match="NaN or infinite values in W_dec"):
        lazy.decoder_rows(0, [4, 5])
    with pytest.raises(SAEError, match="NaN or infinite values in W_dec"):
        lazy.layers[0].W_dec
    with pytest.raises(SAEError, match="NaN or infinite values in W_dec"):
        load_transcoder_set(folder, lazy_decoders=False)


def test_jumprelu_without_threshold_names_it(tmp_path):
    folder = _set(tmp_path / "s", "jumprelu")
    assert load_transcoder_set(folder).layers[0].activation == "jumprelu"
    _edit(folder / "layer_0.safetensors", **{"activation_function.threshold": None})
    with pytest.raises(SAEError, match="is JumpReLU but holds no activation_function.threshold"):
        load_transcoder_set(folder)
