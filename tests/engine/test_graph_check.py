"""Clamp checks: the graph's linear prediction (path sums over the stored edges) against a hand computation, and
the real model's measured change against the project's own edit mechanism (a different hook path)."""
import numpy as np
import pytest
import torch

from desktop_app.demo_assets import resources_dir
from desktop_app.engine.errors import SpecError
from desktop_app.engine.graph_check import clamp_check, predicted_logit_change


def _chain():
    # nodes: f0 (act 2) -> f1 (act 4) -> logit; f0 -> logit directly; an error node feeding f1
    ids = np.array(["0_1_3", "1_2_3", "0_-1_3", "3_7_3"])
    kinds = np.array(["feature", "feature", "error", "logit"])
    adj = np.zeros((4, 4))
    adj[1, 0] = 2 * 0.5   # act(f0) x per-unit effect 0.5 on f1's input
    adj[3, 1] = 4 * -1.5  # act(f1) x -1.5
    adj[3, 0] = 2 * 0.25
    adj[1, 2] = 9.0       # an error node's edge: held fixed, never part of a prediction
    return {"node_ids": ids, "node_kind": kinds, "adjacency": adj, "node_activation": np.array([2.0, 4.0, 0, 0.3])}


def test_prediction_sums_the_paths_per_unit_activation():
    total, direct = predicted_logit_change(_chain(), "0_1_3", 0.2)
    np.testing.assert_allclose(direct, [0.2 * 0.25], atol=1e-12)
    np.testing.assert_allclose(total, [0.2 * (0.25 + 0.5 * -1.5)], atol=1e-12)
    total, direct = predicted_logit_change(_chain(), "1_2_3", -1.0)
    np.testing.assert_allclose(total, [1.5], atol=1e-12)
    with pytest.raises(SpecError, match="only feature nodes"):
        predicted_logit_change(_chain(), "0_-1_3", 1.0)
    with pytest.raises(SpecError, match="no node"):
        predicted_logit_change(_chain(), "9_9_9", 1.0)


def test_measured_change_equals_the_edit_mechanism_on_the_demo():
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.edits import add_direction, next_token_logits
    from desktop_app.engine.jobs import CancelToken, drive
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoders import load_transcoder_set

    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    tset = load_transcoder_set(demo / "transcoders")
    ex = drive(attribution_graph_job(lm, tokens, "", tset=tset, max_n_logits=5)).extras
    f = np.where(ex["node_kind"] == "feature")[0]
    i = int(f[np.argmax(ex["node_influence"][f])])
    L, p, feat = int(ex["node_layer"][i]), int(ex["node_pos"][i]), int(ex["node_feature"][i])
    delta = 0.5 * float(ex["node_activation"][i])
    check = clamp_check(lm, tokens.ids, tset, ex, str(ex["node_ids"][i]), delta)
    ids = torch.tensor([tokens.ids])
    base = next_token_logits(lm, ids, None, CancelToken())
    edited = next_token_logits(lm, ids, {f"blocks.{L}.mlp_out": add_direction(tset.layers[L].W_dec[feat].numpy(),
                                                                           delta, [p])}, CancelToken())
    ref = (edited - base).double().numpy()[check["logit_tokens"]]
    np.testing.assert_allclose(check["measured"], ref, atol=1e-5)
    assert np.abs(ref).max() > 1e-3  # the clamp does move the logits
    assert check["predicted"].shape == check["measured"].shape


def test_last_layer_clamp_matches_the_prediction_once_the_final_norm_scale_is_frozen():
    """For a feature of the last layer the only path is the final norm and the unembedding: with the norm's
    scale frozen (as the replacement model freezes it) the real model's change equals the prediction; with the
    real norm it does not (the scale's own first-order change), which the check reports rather than hides."""
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoders import load_transcoder_set

    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    tset = load_transcoder_set(demo / "transcoders")
    ex = drive(attribution_graph_job(lm, tokens, "", tset=tset, max_n_logits=5)).extras
    last = np.where((ex["node_kind"] == "feature") & (ex["node_layer"] == lm.info.n_layers - 1))[0]
    i = int(last[np.argmax(ex["node_influence"][last])])
    ln_f, seen = lm.model.transformer.ln_f, {}
    handle = ln_f.register_forward_hook(lambda m, a, o: seen.update(x0=a[0].clone(), y0=o.clone()))
    with torch.no_grad():
        lm.model(torch.tensor([tokens.ids]))
    handle.remove()
    scale = torch.sqrt(seen["x0"].var(-1, unbiased=False, keepdim=True) + ln_f.eps)

    def frozen_scale(m, a, o):
        d = a[0] - seen["x0"]
        return seen["y0"] + ln_f.weight * (d - d.mean(-1, keepdim=True)) / scale

    delta = 0.1 * float(ex["node_activation"][i])
    real = clamp_check(lm, tokens.ids, tset, ex, str(ex["node_ids"][i]), delta)
    handle = ln_f.register_forward_hook(frozen_scale)
    try:
        frozen = clamp_check(lm, tokens.ids, tset, ex, str(ex["node_ids"][i]), delta)
    finally:
        handle.remove()
    np.testing.assert_allclose(frozen["measured"], frozen["predicted"], atol=1e-5 + 1e-3 * np.abs(frozen["predicted"]).max())
    np.testing.assert_allclose(real["predicted"], frozen["predicted"])
    assert np.abs(real["measured"] - real["predicted"]).max() > 1e-3  # the real norm's scale does move
