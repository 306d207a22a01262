"""Attribution patching against two independent references.

1. A finite-difference directional derivative in float64: for a cell, run the target prompt with the activation
   moved a little towards the source activation at that cell (bare torch hooks on a float64 copy of the model),
   and compare the 5-point central difference, added to the target's metric, with the job's value. This is exactly what
   attribution patching estimates, for every component and model.
2. Where the metric is an affine function of the patched activation, the first-order estimate IS the exact patch.
   That is not the case at layer 0 resid_pre (every block after it is nonlinear), so the test makes it true
   instead: with the final norm replaced by the identity, the logits are linear in the last block's outputs
   (GPT-NeoX's parallel block adds attention and MLP outputs straight to the residual stream), and
   logit_diff / logit_diff_recovered are affine in the logits, so attribution == activation patching there.
"""

import copy

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.adapters import make_adapter
from desktop_app.engine.attribution import attribution_patching_job, cost_in_forward_passes
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.patching import activation_patching_job
from desktop_app.engine.prompts import prepare_pair

EX = demo_task.ioi_examples(3, seed=4)[0]


@pytest.fixture(scope="module")
def models(gpt2_dir, llama_dir, neox_dir):
    return {k: load_model(d, dtype="float32", device="cpu") for k, d in
            (("gpt2", gpt2_dir), ("llama", llama_dir), ("neox", neox_dir))}


def _pair(lm):
    return prepare_pair(lm, EX.clean, EX.corrupted, EX.answer, EX.wrong)


# ---- reference 1: finite differences in float64 ---------------------------------------------------------

def _hook(model, adapter, component, layer, fn, n_heads):
    if component == "resid_pre":
        def pre(_m, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return adapter.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    if component == "head_out":
        def pre_z(_m, args):
            flat = args[0]
            return (fn(flat.reshape(*flat.shape[:-1], n_heads, -1)).reshape(flat.shape),) + tuple(args[1:])
        return adapter.o_proj(layer).register_forward_pre_hook(pre_z)
    module = {"resid_post": adapter.blocks[layer], "attn_out": adapter.attn(layer), "mlp_out": adapter.mlp(layer)}[component]

    def post(_m, _i, out):
        return (fn(out[0]),) + tuple(out[1:]) if isinstance(out, tuple) else fn(out)
    return module.register_forward_hook(post)


def _run64(model, ids, hook=None):
    try:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, -1]
    finally:
        if hook is not None:
            hook.remove()


def _capture64(model, adapter, ids, component, layer, n_heads):
    seen = {}

    def keep(a):
        seen["a"] = a[0].clone()
        return a
    _run64(model, ids, _hook(model, adapter, component, layer, keep, n_heads))
    return seen["a"]


def _fd_reference(lm, pair, component, direction, metric, positions, cells_per_layer):
    model = copy.deepcopy(lm.model).double()
    adapter, n_heads = make_adapter(model), lm.info.n_heads
    a, w = pair.answer_id, pair.wrong_id
    src_ids, tgt_ids = ((pair.clean.ids, pair.corrupted.ids) if direction == "denoise"
                        else (pair.corrupted.ids, pair.clean.ids))
    ld = lambda logits: float(logits[a] - logits[w])
    ld_clean, ld_corr = ld(_run64(model, pair.clean.ids)), ld(_run64(model, pair.corrupted.ids))
    if metric == "logit_diff":
        m = ld
    else:
        m = lambda logits: (ld(logits) - ld_corr) / (ld_clean - ld_corr)
    base = m(_run64(model, tgt_ids))
    # Llama's RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny: a 5-point stencil
    # with h = 1e-2 keeps both the truncation (h^4) and the float32 rounding (1e-7 / h) below 1e-5
    h = 1e-2
    ref = {}
    for L in range(lm.info.n_layers):
        diff = (_capture64(model, adapter, src_ids, component, L, n_heads)
                - _capture64(model, adapter, tgt_ids, component, L, n_heads))
        for cell in cells_per_layer:
            p, head = cell
            mask = torch.zeros_like(diff)
            sel = (slice(None) if positions == "all" else p,) + ((head,) if head is not None else ())
            mask[sel] = 1

            def shifted(sign):
                def fn(act):
                    return act + sign * h * (diff * mask)[None]
                return m(_run64(model, tgt_ids, _hook(model, adapter, component, L, fn, n_heads)))
            key = (L,) + ((p,) if positions == "each" else ()) + ((head,) if head is not None else ())
            ref[key] = base + (8 * (shifted(1) - shifted(-1)) - (shifted(2) - shifted(-2))) / (12 * h)
    return ref, base


@pytest.mark.parametrize("model,component,direction,metric,positions", [
    ("gpt2", "resid_pre", "denoise", "logit_diff_recovered", "each"),
    ("llama", "head_out", "denoise", "logit_diff", "each"),
    ("neox", "mlp_out", "noise", "logit_diff_recovered", "each"),
    ("gpt2", "attn_out", "noise", "logit_diff", "all"),
    ("llama", "resid_post", "denoise", "logit_diff", "each"),
    ("neox", "head_out", "noise", "logit_diff", "all")])
def test_attribution_equals_finite_difference(models, model, component, direction, metric, positions):
    lm = models[model]
    pair = _pair(lm)
    res = drive(attribution_patching_job(lm, pair, component, positions, direction, metric))
    n = pair.n_pos
    pos_list = sorted({0, n // 2, n - 2, n - 1} | {i for i in range(n) if pair.clean.ids[i] != pair.corrupted.ids[i]})
    heads = range(lm.info.n_heads) if component == "head_out" else [None]
    cells = [(p, hd) for p in (pos_list if positions == "each" else [None]) for hd in heads]
    ref, base = _fd_reference(lm, pair, component, direction, metric, positions, cells)
    scale = max(1.0, float(np.abs(list(ref.values())).max()))
    for key, val in ref.items():
        assert res.values[key] == pytest.approx(val, abs=2e-4 * scale), key
    assert np.isfinite(res.values).all()
    assert (res.corrupted_metric if direction == "denoise" else res.clean_metric) == pytest.approx(base, abs=1e-4 * scale)
    assert res.dims == drive(activation_patching_job(lm, pair, component, positions, direction, metric,
                                                     layers=[0])).dims


# ---- reference 2: the exact patch where the map is affine ------------------------------------------------

@pytest.fixture(scope="module")
def linear_head_neox(neox_dir):
    lm = load_model(neox_dir, dtype="float32", device="cpu")
    lm.model.gpt_neox.final_layer_norm = torch.nn.Identity()
    lm.adapter.final_norm = lm.model.gpt_neox.final_layer_norm
    return lm


@pytest.mark.parametrize("component", ["resid_post", "attn_out", "mlp_out", "head_out"])
@pytest.mark.parametrize("metric,direction", [("logit_diff", "denoise"), ("logit_diff_recovered", "noise")])
def test_attribution_is_exact_where_the_metric_is_affine(linear_head_neox, component, metric, direction):
    lm = linear_head_neox
    pair = _pair(lm)
    last = [lm.info.n_layers - 1]
    for positions in ("each", "all"):
        attr = drive(attribution_patching_job(lm, pair, component, positions, direction, metric, layers=last))
        exact = drive(activation_patching_job(lm, pair, component, positions, direction, metric, layers=last))
        assert attr.dims == exact.dims and attr.labels == exact.labels
        np.testing.assert_allclose(attr.values, exact.values, atol=2e-4)
        if component == "resid_post" and positions == "each":
            assert np.abs(exact.values[0, -1] - exact.values[0, 0]) > 1e-3  # the check is not vacuous
    # and "all" is the sum of the per-position changes
    each = drive(attribution_patching_job(lm, pair, component, "each", direction, metric, layers=last))
    allp = drive(attribution_patching_job(lm, pair, component, "all", direction, metric, layers=last))
    base = each.corrupted_metric if direction == "denoise" else each.clean_metric
    np.testing.assert_allclose(allp.values, base + (each.values - base).sum(axis=1), atol=1e-4)


def test_not_exact_where_the_model_is_nonlinear(models):
    """Layer 0 resid_pre goes through every nonlinear block: the estimate differs from the exact patch there."""
    lm = models["gpt2"]
    pair = _pair(lm)
    attr = drive(attribution_patching_job(lm, pair, "resid_pre", "each", "denoise", "logit_diff", layers=[0]))
    exact = drive(activation_patching_job(lm, pair, "resid_pre", "each", "denoise", "logit_diff", layers=[0]))
    assert not np.allclose(attr.values, exact.values, atol=1e-3)
    # where the prompts agree the source and target activations are equal: no change at all, exactly
    same = [i for i in range(pair.n_pos) if pair.clean.ids[i] == pair.corrupted.ids[i]]
    np.testing.assert_allclose(attr.values[0, same], exact.corrupted_metric, atol=1e-5)


def test_cost_and_inference_mode(models):
    assert cost_in_forward_passes() <= 4
    lm = models["gpt2"]
    pair = _pair(lm)
    plain = drive(attribution_patching_job(lm, pair, "head_out", "each", "denoise", "logit_diff"))
    with torch.inference_mode():  # the UI worker runs jobs inside inference mode
        inside = drive(attribution_patching_job(lm, pair, "head_out", "each", "denoise", "logit_diff"))
    np.testing.assert_allclose(inside.values, plain.values, atol=1e-6)
    assert all(not p.requires_grad for p in lm.model.parameters())
