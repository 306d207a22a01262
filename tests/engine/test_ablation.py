"""Ablation sweeps against a reference written here: one plain forward pass per cell with a bare torch hook."""

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.ablation import ablation_job, noise_seed
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import CancelToken, Partial, drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.prompts import prepare_pair

EX = demo_task.ioi_examples(6, seed=21)


@pytest.fixture(scope="module")
def models(gpt2_dir, llama_dir, neox_dir):
    return {k: load_model(d, dtype="float32", device="cpu") for k, d in
            (("gpt2", gpt2_dir), ("llama", llama_dir), ("neox", neox_dir))}


def _pair(lm, ex=EX[0]):
    return prepare_pair(lm, ex.clean, ex.corrupted, ex.answer, ex.wrong)


# ---- the reference: bare torch hooks on the adapter's modules --------------------------------------------

def _module_hook(lm, component, layer, fn):
    """Register a hook that maps the activation [batch, pos, ...] through fn; returns the handle."""
    a = lm.adapter
    if component == "resid_pre":
        def pre(_m, args, kwargs):
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        return a.blocks[layer].register_forward_pre_hook(pre, with_kwargs=True)
    if component == "head_out":
        n_heads = lm.info.n_heads

        def pre_z(_m, args):
            flat = args[0]
            z = fn(flat.reshape(*flat.shape[:-1], n_heads, -1))
            return (z.reshape(flat.shape),) + tuple(args[1:])
        return a.o_proj(layer).register_forward_pre_hook(pre_z)
    module = {"resid_post": a.blocks[layer], "attn_out": a.attn(layer), "mlp_out": a.mlp(layer)}[component]

    def post(_m, _inp, out):
        if isinstance(out, tuple):
            return (fn(out[0]),) + out[1:]
        return fn(out)
    return module.register_forward_hook(post)


def _last_logits(lm, ids, component=None, layer=None, fn=None):
    handle = _module_hook(lm, component, layer, fn) if component else None
    try:
        with torch.no_grad():
            return lm.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    finally:
        if handle:
            handle.remove()


def _capture(lm, ids, component, layer):
    seen = {}

    def keep(t):
        seen["a"] = t.detach().clone()
        return t
    _last_logits(lm, ids, component, layer, keep)
    return seen["a"][0]


def _ld(logits, pair):
    return float(logits[pair.answer_id] - logits[pair.wrong_id])


def reference(lm, pair, component, positions, repl):
    """repl: {layer: replacement [pos, ...]}; returns the logit difference per cell, laid out like the job."""
    n_pos, heads = pair.n_pos, component == "head_out"
    out = {}
    for L, r in repl.items():
        # a spread of positions keeps the test fast; the job computes them all in the same batched rows
        pos_list = sorted({0, 1, n_pos // 2, n_pos - 2, n_pos - 1}) if positions == "each" else [None]
        head_list = range(lm.info.n_heads) if heads else [None]
        for p in pos_list:
            for h in head_list:
                def fn(act, p=p, h=h, r=r):
                    act = act.clone()
                    sl = (0, slice(None) if p is None else p)
                    src = r if p is None else r[p]
                    if h is None:
                        act[sl] = src
                    else:
                        act[sl + (Ellipsis, h, slice(None))] = src[..., h, :]
                    return act
                key = (L,) + (() if p is None else (p,)) + (() if h is None else (h,))
                out[key] = _ld(_last_logits(lm, pair.clean.ids, component, L, fn), pair)
    return out


def _compare(result, ref):
    for key, val in ref.items():
        assert result.values[key] == pytest.approx(val, abs=1e-5), key
    assert np.isfinite(result.values).all()


def _run(lm, pair, **kw):
    return drive(ablation_job(lm, pair, metric="logit_diff", batch_size=kw.pop("batch_size", 7), **kw))


# ---- the methods --------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,component,positions", [
    ("gpt2", "head_out", "each"), ("llama", "head_out", "all"), ("neox", "resid_pre", "each"),
    ("gpt2", "resid_post", "each"), ("llama", "mlp_out", "each"), ("neox", "attn_out", "all")])
def test_zero_ablation_matches_reference(models, model, component, positions):
    lm = models[model]
    pair = _pair(lm)
    res = _run(lm, pair, component=component, method="zero", positions=positions)
    repl = {L: torch.zeros_like(_capture(lm, pair.clean.ids, component, L)) for L in range(lm.info.n_layers)}
    _compare(res, reference(lm, pair, component, positions, repl))
    assert res.dims[0] == "layer" and res.kind == "ablation"
    assert res.clean_metric == pytest.approx(_ld(_last_logits(lm, pair.clean.ids), pair), abs=1e-5)


@pytest.mark.parametrize("model,component", [("gpt2", "resid_pre"), ("llama", "head_out"), ("neox", "mlp_out")])
def test_mean_over_prompts_of_the_same_length_is_per_position(models, model, component):
    lm = models[model]
    pair = _pair(lm)
    n = pair.n_pos
    refs = [e.corrupted for e in demo_task.ioi_examples(60, seed=5)
            if len(lm.tokenize(e.corrupted).ids) == n][:3]
    assert len(refs) == 3
    res = _run(lm, pair, component=component, method="mean", positions="each", reference_prompts=refs)
    repl = {L: torch.stack([_capture(lm, lm.tokenize(t).ids, component, L) for t in refs]).mean(0)
            for L in range(lm.info.n_layers)}
    _compare(res, reference(lm, pair, component, "each", repl))


def test_mean_over_prompts_of_other_lengths_is_one_vector(models):
    lm = models["gpt2"]
    pair = _pair(lm)
    refs = ["Mary went home", "After Bob and Alice arrived at the park, Bob handed a gift to Alice."]
    res = _run(lm, pair, component="attn_out", method="mean", positions="each", reference_prompts=refs)
    repl = {}
    for L in range(lm.info.n_layers):
        every_token = torch.cat([_capture(lm, lm.tokenize(t).ids, "attn_out", L) for t in refs])
        repl[L] = every_token.mean(0).expand(pair.n_pos, -1)
    _compare(res, reference(lm, pair, "attn_out", "each", repl))


@pytest.mark.parametrize("model,component", [("llama", "resid_post"), ("gpt2", "head_out")])
def test_mean_over_positions_of_the_clean_run(models, model, component):
    lm = models[model]
    pair = _pair(lm)
    res = _run(lm, pair, component=component, method="mean", mean_over="positions", positions="each")
    repl = {}
    for L in range(lm.info.n_layers):
        a = _capture(lm, pair.clean.ids, component, L)
        repl[L] = a.mean(0, keepdim=True).expand_as(a)
    _compare(res, reference(lm, pair, component, "each", repl))


@pytest.mark.parametrize("model,component", [("gpt2", "mlp_out"), ("llama", "head_out"), ("neox", "resid_pre")])
def test_noise_ablation_is_seeded_and_matches_reference(models, model, component):
    lm = models[model]
    pair = _pair(lm)
    res = _run(lm, pair, component=component, method="noise", noise=2.0, seed=3, positions="each")
    repl = {}
    for L in range(lm.info.n_layers):
        a = _capture(lm, pair.clean.ids, component, L)
        g = torch.Generator().manual_seed(noise_seed(3, L))
        repl[L] = a + 2.0 * a.std() * torch.randn((1,) + tuple(a.shape), generator=g)[0]
    _compare(res, reference(lm, pair, component, "each", repl))
    again = _run(lm, pair, component=component, method="noise", noise=2.0, seed=3, positions="each", batch_size=64)
    np.testing.assert_allclose(again.values, res.values, atol=1e-6)
    other = _run(lm, pair, component=component, method="noise", noise=2.0, seed=4, positions="each")
    assert not np.allclose(other.values, res.values)


@pytest.mark.parametrize("model,component", [("gpt2", "head_out"), ("llama", "resid_pre"), ("neox", "attn_out")])
def test_resample_from_another_prompt(models, model, component):
    lm = models[model]
    pair = _pair(lm)
    source = next(e.clean for e in demo_task.ioi_examples(60, seed=8)
                  if len(lm.tokenize(e.clean).ids) == pair.n_pos and e.clean != EX[0].clean)
    res = _run(lm, pair, component=component, method="resample", source_prompt=source, positions="each")
    repl = {L: _capture(lm, lm.tokenize(source).ids, component, L) for L in range(lm.info.n_layers)}
    _compare(res, reference(lm, pair, component, "each", repl))


def test_resample_defaults_to_the_corrupted_prompt_and_equals_noising_patch(models):
    from desktop_app.engine.patching import activation_patching_job
    lm = models["llama"]
    pair = _pair(lm)
    res = _run(lm, pair, component="head_out", method="resample", positions="each")
    patch = drive(activation_patching_job(lm, pair, "head_out", "each", "noise", "logit_diff"))
    np.testing.assert_allclose(res.values, patch.values, atol=1e-5)


# ---- one full hook point ---------------------------------------------------------------------------------

def test_full_hook_name_ablates_that_hook_only(models):
    lm = models["gpt2"]
    pair = _pair(lm)
    res = _run(lm, pair, component="blocks.1.attn.hook_z", method="zero", positions="all")
    assert res.dims == ["hook"] and res.values.shape == (1,) and res.labels["hook"] == ["blocks.1.attn.hook_z"]
    ref = _ld(_last_logits(lm, pair.clean.ids, "head_out", 1, torch.zeros_like), pair)
    assert res.values[0] == pytest.approx(ref, abs=1e-5)

    each = _run(lm, pair, component="blocks.0.hook_mlp_out", method="mean", mean_over="positions",
                positions="each", batch_size=4)
    assert each.dims == ["position"]
    a = _capture(lm, pair.clean.ids, "mlp_out", 0)
    mean = a.mean(0)
    for p in range(pair.n_pos):
        def fn(act, p=p):
            act = act.clone()
            act[0, p] = mean
            return act
        assert each.values[p] == pytest.approx(_ld(_last_logits(lm, pair.clean.ids, "mlp_out", 0, fn), pair), abs=1e-5)


def test_embedding_hook_can_be_ablated(models):
    lm = models["neox"]
    pair = _pair(lm)
    res = _run(lm, pair, component="hook_embed", method="zero", positions="each")
    emb = lm.adapter.embed
    for p in (0, pair.n_pos - 1):
        def zero_p(_m, _i, out, p=p):
            out = out.clone()
            out[0, p] = 0
            return out
        h = emb.register_forward_hook(zero_p)
        try:
            ref = _ld(_last_logits(lm, pair.clean.ids), pair)
        finally:
            h.remove()
        assert res.values[p] == pytest.approx(ref, abs=1e-5)


# ---- errors, cancel ------------------------------------------------------------------------------------

def test_user_errors(models):
    lm = models["gpt2"]
    pair = _pair(lm)
    with pytest.raises(PromptError, match="source prompt is .* tokens"):
        _run(lm, pair, component="resid_pre", method="resample", source_prompt="Mary went home")
    with pytest.raises(SpecError, match="reference_prompts"):
        _run(lm, pair, component="resid_pre", method="mean")
    with pytest.raises(SpecError, match="hook_pattern"):
        _run(lm, pair, component="blocks.0.attn.hook_pattern", method="zero")
    with pytest.raises(SpecError, match="hook point"):
        _run(lm, pair, component="blocks.9.hook_resid_pre", method="zero")
    with pytest.raises(SpecError, match="method"):
        _run(lm, pair, component="resid_pre", method="delete")
    neox = models["neox"]
    with pytest.raises(SpecError):
        _run(neox, _pair(neox), component="blocks.0.hook_resid_mid", method="zero")


def test_cancel_keeps_finished_cells(models):
    lm = models["gpt2"]
    pair = _pair(lm)
    token = CancelToken()
    job = ablation_job(lm, pair, component="head_out", positions="each", cancel=token, batch_size=4)

    def on_event(ev):
        if isinstance(ev, Partial):
            token.cancel()
    res = drive(job, on_event)
    assert res.status == "partial" and 0 < np.isfinite(res.values).sum() < res.values.size
