"""Every model family the README promises: tiny random models built from transformers' config classes, saved
and loaded through the real loader, pass the conformance checks, and their patching sweeps equal a plain
one-forward-per-cell reference (or are refused with a clear message)."""
import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.conformance import CHECKS, check_model, checks_for_component
from desktop_app.engine.errors import ConformanceError, ModelLoadError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.patching import activation_patching_job
from desktop_app.engine.prompts import prepare_pair
from family_models import FAMILIES, build_family

CLEAN = "When Mary and John went to the store, John gave a drink to"  # 14 tokens: longer than the windows (4)
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"
PARALLEL = {"gpt_neox", "gptj", "phi", "cohere", "falcon", "falcon_new"}
# family -> the checks expected to fail (the analyses that depend on them are refused); every other check passes
EXPECTED_FAILURES: dict[str, set[str]] = {"opt_post_ln": {"decomposition"}, "bloom_ln_residual": {"decomposition"}}
ADAPTER_FAMILY = {"falcon_alibi": "falcon", "falcon_new": "falcon", "opt_post_ln": "opt", "bloom_ln_residual": "bloom"}


def refused(lm, component, restarts=True):
    """The first failed check `component` depends on, or None."""
    return next((c for c in checks_for_component(component, restarts) if not lm.conformance.ok(c)), None)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_lm(request, models_root, ioi_tokenizer):
    folder = models_root / f"family_{request.param}"
    if not (folder / "config.json").is_file():
        model = build_family(request.param, ioi_tokenizer.get_vocab_size())
        model.save_pretrained(folder)
        demo_task.save_hf_tokenizer(ioi_tokenizer, folder)
    return request.param, load_model(folder, dtype="float32", device="cpu")


def test_conformance_checks(family_lm):
    family, lm = family_lm
    conf = lm.conformance
    assert conf is not None and set(conf.checks) == set(CHECKS)
    expected = EXPECTED_FAILURES.get(family, set())
    failed = {c.name for c in conf.failed()}
    assert failed == expected, {c.name: c.describe() for c in conf.failed()}
    assert conf.to_dict()["family"] == ADAPTER_FAMILY.get(family, family)
    for c in conf.checks.values():
        assert c.time_ms >= 0 and c.tolerance > 0


def test_block_form_and_hook_points(family_lm):
    family, lm = family_lm
    assert lm.info.parallel_attn_mlp == (family in PARALLEL)
    names = {p.name for p in lm.hook_points()}
    assert (hook_name(0, "resid_mid") in names) == (family not in PARALLEL)


def _reference(lm, pair, component):
    """logit_diff of the corrupted prompt with one (layer, position[, head]) slice taken from the clean run,
    one plain forward pass per cell."""
    kind = "attn.hook_z" if component == "head_out" else component
    names = [hook_name(L, kind) for L in range(lm.info.n_layers)]
    a, w = pair.answer_id, pair.wrong_id
    with torch.no_grad(), hooks(lm, read=names) as clean:
        forward_logits(lm, torch.tensor([pair.clean.ids]))
    shape = [lm.info.n_layers, pair.n_pos] + ([lm.info.n_heads] if component == "head_out" else [])
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        name = names[idx[0]]
        where = (slice(None),) + tuple(idx[1:])

        def patch(act, name=name, where=where):
            act = act.clone()
            act[where] = clean[name][where]
            return act
        with torch.no_grad(), hooks(lm, write={name: patch}):
            logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1]
        out[idx] = float(logits[a] - logits[w])
    return out


@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "mlp_out", "head_out", "resid_post"])
def test_patching_equals_reference(family_lm, component):
    family, lm = family_lm
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    assert pair.n_pos > 4  # longer than the sliding windows of the tiny models
    check = refused(lm, component)
    if check:
        with pytest.raises(ConformanceError, match=rf"^activation patching of {component} is not available for this "
                                                   rf"\w+ model: the load-time conformance check '{check}' failed "
                                                   r"\(.* by \d\.\d\de[+-]\d\d \(tolerance .*\)\)\.$"):
            drive(activation_patching_job(lm, pair, component=component, metric="logit_diff"))
        return
    result = drive(activation_patching_job(lm, pair, component=component, positions="each", metric="logit_diff",
                                           batch_size=7))
    assert result.status == "complete", result.message
    ref = _reference(lm, pair, component)
    np.testing.assert_allclose(result.values, ref, atol=1e-4, rtol=0)


def test_resid_mid_only_where_it_exists(family_lm):
    family, lm = family_lm
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    if refused(lm, "resid_mid"):
        with pytest.raises(ConformanceError, match="resid_mid"):
            drive(activation_patching_job(lm, pair, component="resid_mid", metric="logit_diff"))
        return
    if family in PARALLEL:
        with pytest.raises(Exception, match="resid_mid does not exist"):
            drive(activation_patching_job(lm, pair, component="resid_mid", positions="each", metric="logit_diff"))
        return
    result = drive(activation_patching_job(lm, pair, component="resid_mid", positions="all", metric="logit_diff"))
    ref = _reference(lm, pair, "resid_mid")  # [layer, pos]; "all" positions: patch every position at once
    with torch.no_grad():
        full = []
        for L in range(lm.info.n_layers):
            name = hook_name(L, "resid_mid")
            with hooks(lm, read=[name]) as clean:
                forward_logits(lm, torch.tensor([pair.clean.ids]))
            with hooks(lm, write={name: lambda act, c=clean[name]: c.clone()}):
                logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1]
            full.append(float(logits[pair.answer_id] - logits[pair.wrong_id]))
    assert ref.shape[0] == lm.info.n_layers
    np.testing.assert_allclose(result.values, full, atol=1e-4, rtol=0)


# ---- refusals ----------------------------------------------------------------------------------------------

def test_failed_check_refuses_exactly_its_analyses(lm_llama):
    """A model whose hook_z check fails loses head_out patching (one sentence with the measured difference) and
    keeps resid_pre patching."""
    import copy
    lm = copy.copy(lm_llama)
    lm.conformance = copy.deepcopy(lm_llama.conformance)
    bad = lm.conformance.checks["hook_z"]
    bad.passed, bad.max_abs_diff = False, 0.25
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    with pytest.raises(ConformanceError, match=r"'hook_z' failed .*2\.50e-01") as err:
        drive(activation_patching_job(lm, pair, component="head_out", metric="logit_diff"))
    assert str(err.value).count(". ") == 0  # one sentence
    ok = drive(activation_patching_job(lm, pair, component="resid_pre", metric="logit_diff"))
    assert ok.status == "complete"


def test_broken_adapter_is_caught_with_the_measured_difference(models_root, ioi_tokenizer):
    """An adapter that reads attn_out before Gemma 2's post-attention norm (the bug of a generic guess) fails the
    decomposition and hook_z checks with a measured difference well above the tolerance."""
    from desktop_app.engine.loading import wrap_model

    lm = wrap_model(build_family("gemma2", ioi_tokenizer.get_vocab_size()))
    assert lm.conformance.ok("decomposition")
    lm.adapter.post_attn_norm_name = lm.adapter.post_mlp_norm_name = None
    conf = check_model(lm)
    dec = conf.checks["decomposition"]
    assert not dec.passed and dec.max_abs_diff > 10 * dec.tolerance
    assert "differs from resid_post by" in dec.describe()


def test_unknown_family_failing_the_check_is_refused(ioi_tokenizer, monkeypatch):
    """A family the adapters do not know goes through the generic fallback; where its guess is wrong (here a
    Granite model, whose residual multiplier the generic adapter does not know), loading is refused in one
    sentence naming the family and the failed check."""
    from desktop_app.engine import adapters
    from desktop_app.engine.loading import wrap_model

    monkeypatch.delitem(adapters.FAMILIES, "granite")
    with pytest.raises(ModelLoadError, match=r"granite is not a model family .* conformance check "
                                             r"'decomposition' \(.* by [0-9.e+-]+ \(tolerance"):
        wrap_model(build_family("granite", ioi_tokenizer.get_vocab_size()))


def test_unknown_family_passing_the_check_loads(ioi_tokenizer, monkeypatch):
    from desktop_app.engine import adapters
    from desktop_app.engine.loading import wrap_model

    monkeypatch.delitem(adapters.FAMILIES, "qwen2")
    lm = wrap_model(build_family("qwen2", ioi_tokenizer.get_vocab_size()))
    assert lm.adapter.family == "generic" and not lm.conformance.failed()


# ---- sliding windows -------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "phi3", "qwen2"])
def test_recorded_run_keeps_every_position_on_sliding_layers(family, ioi_tokenizer):
    from desktop_app.engine.loading import wrap_model
    from desktop_app.engine.replay import record_run

    lm = wrap_model(build_family(family, ioi_tokenizer.get_vocab_size()))
    run = record_run(lm, torch.arange(12))
    assert run.prefix_kv is not None and all(k.shape[-2] == 12 for k, _ in run.prefix_kv)
    assert lm.conformance.ok("prefix_restart")


def test_windowed_cache_turns_prefix_reuse_off_and_stays_exact(ioi_tokenizer, monkeypatch):
    """With the model's own cache (transformers keeps only the last window of keys on sliding layers) the recorded
    keys do not cover the prompt: prefix reuse is off, and sweeps restart from position 0 and stay exact."""
    from transformers import DynamicCache

    from desktop_app.engine import replay
    from desktop_app.engine.loading import wrap_model

    model = build_family("mistral", ioi_tokenizer.get_vocab_size())
    monkeypatch.setattr(replay, "_full_cache", lambda: DynamicCache(config=model.config))
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=ioi_tokenizer, bos_token=demo_task.BOS_TOKEN)
    lm = wrap_model(model, tok)
    assert replay.record_run(lm, torch.arange(12)).prefix_kv is None
    assert not lm.conformance.ok("prefix_restart")
    assert "restart from position 0" in lm.conformance.checks["prefix_restart"].note
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    result = drive(activation_patching_job(lm, pair, component="attn_out", metric="logit_diff", batch_size=5))
    np.testing.assert_allclose(result.values, _reference(lm, pair, "attn_out"), atol=1e-4, rtol=0)


def test_prefix_check_catches_keys_of_the_wrong_positions(ioi_tokenizer, monkeypatch):
    """Were the last window of keys taken for the first positions (the old behaviour), the prefix check fails."""
    from transformers import DynamicCache

    from desktop_app.engine import replay
    from desktop_app.engine.loading import wrap_model

    model = build_family("mistral", ioi_tokenizer.get_vocab_size())
    monkeypatch.setattr(replay, "_full_cache", lambda: DynamicCache(config=model.config))

    def without_coverage_check(cache, n_layers, n_pos):
        return [(cache.layers[i].keys, cache.layers[i].values) for i in range(n_layers)]
    monkeypatch.setattr(replay, "_cache_tensors", without_coverage_check)
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_object=ioi_tokenizer, bos_token=demo_task.BOS_TOKEN)
    lm = wrap_model(model, tok)
    assert not lm.conformance.ok("prefix_restart") and lm.conformance.ok("restart")
    # the sweep still runs, restarted from position 0 instead of refusing, and stays exact
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    result = drive(activation_patching_job(lm, pair, component="mlp_out", metric="logit_diff", batch_size=5))
    np.testing.assert_allclose(result.values, _reference(lm, pair, "mlp_out"), atol=1e-4, rtol=0)


# ---- attribution patching (gradients through every family's hook points) ----------------------------------

@pytest.mark.parametrize("component", ["resid_pre", "attn_out", "mlp_out", "head_out"])
def test_attribution_equals_a_finite_difference(family_lm, component):
    """Attribution patching's value for a whole layer (positions "all") is the metric's directional derivative
    towards the clean activation; a central finite difference of plain forward passes gives the same."""
    from desktop_app.engine.attribution import attribution_patching_job

    family, lm = family_lm
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    if refused(lm, component, restarts=False):
        with pytest.raises(ConformanceError, match=f"attribution patching of {component} is not available"):
            drive(attribution_patching_job(lm, pair, component=component, metric="logit_diff"))
        return
    result = drive(attribution_patching_job(lm, pair, component=component, positions="all", metric="logit_diff"))
    kind = "attn.hook_z" if component == "head_out" else component
    a, w = pair.answer_id, pair.wrong_id

    def metric_at(name, act):
        with torch.no_grad(), hooks(lm, write={name: lambda x: act.to(x.dtype)}):
            logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1].double()
        return float(logits[a] - logits[w])
    eps = 1e-2
    for L in range(lm.info.n_layers):
        name = hook_name(L, kind)
        with torch.no_grad(), hooks(lm, read=[name]) as src:
            forward_logits(lm, torch.tensor([pair.clean.ids]))
        with torch.no_grad(), hooks(lm, read=[name]) as tgt:
            base_logits = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1]
        base = float(base_logits[a] - base_logits[w])
        d = src[name] - tgt[name]
        slope = (metric_at(name, tgt[name] + eps * d) - metric_at(name, tgt[name] - eps * d)) / (2 * eps)
        expected = base + slope
        values = result.values[L] if component != "head_out" else result.values[L].sum() - \
            (lm.info.n_heads - 1) * base
        assert values == pytest.approx(expected, abs=2e-3 * max(1.0, abs(slope))), (L, values, expected)


def _with_failed(lm, check):
    import copy
    out = copy.copy(lm)
    out.conformance = copy.deepcopy(lm.conformance)
    c = out.conformance.checks[check]
    c.passed, c.max_abs_diff = False, 0.5
    return out


@pytest.mark.parametrize("check, job, refused_kw, allowed_kw", [
    ("decomposition", "tracing", dict(component="mlp_out"), dict(component="resid_post")),
    ("restart", "tracing", dict(component="resid_post"), None),
    ("hook_z", "ablation", dict(component="head_out"), dict(component="mlp_out")),
    ("decomposition", "ablation", dict(component="blocks.1.hook_attn_out"), dict(component="blocks.1.attn.hook_z")),
    ("restart", "ablation", dict(component="resid_pre"), dict(component="blocks.0.hook_resid_pre")),
    ("unembed", "patching", dict(component="resid_pre"), None),
    ("prefix_restart", "patching", None, dict(component="attn_out")),
])
def test_each_analysis_needs_exactly_its_checks(lm_llama, check, job, refused_kw, allowed_kw):
    from desktop_app.engine.ablation import ablation_job
    from desktop_app.engine.tracing import causal_tracing_job

    lm = _with_failed(lm_llama, check)
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    run = {"tracing": lambda kw: causal_tracing_job(lm, pair, subject="John", samples=2, **kw),
           "ablation": lambda kw: ablation_job(lm, pair, metric="logit_diff", **kw),
           "patching": lambda kw: activation_patching_job(lm, pair, metric="logit_diff", **kw)}[job]
    if refused_kw is not None:
        with pytest.raises(ConformanceError, match=f"'{check}' failed .*5.00e-01"):
            drive(run(refused_kw))
    if allowed_kw is not None:
        assert drive(run(allowed_kw)).status == "complete"


def test_sae_jobs_need_exactly_their_checks(lm_llama):
    from desktop_app.engine.sae.jobs import sae_feature_patching_job, sae_features_job
    from desktop_app.engine.sae.model import SAE, SAEConfig

    def sae(hook):
        return SAE(SAEConfig(architecture="standard", d_in=64, d_sae=32, hook_name=hook))
    lm = _with_failed(lm_llama, "decomposition")
    pair = prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    with pytest.raises(ConformanceError, match="SAE features at blocks.1.hook_attn_out .*'decomposition' failed"):
        drive(sae_features_job(lm, CLEAN, sae("blocks.1.hook_attn_out")))
    assert drive(sae_features_job(lm, CLEAN, sae("blocks.1.hook_resid_pre"))).status == "complete"
    lm = _with_failed(lm_llama, "restart")
    with pytest.raises(ConformanceError, match="SAE feature patching at blocks.1.hook_resid_pre .*'restart' failed"):
        drive(sae_feature_patching_job(lm, pair, sae("blocks.1.hook_resid_pre")))


def test_probe_prompt_avoids_image_and_special_tokens(ioi_tokenizer):
    """The check's prompt never holds a token a multimodal forward treats specially (Gemma 3's image token)."""
    import dataclasses

    from desktop_app.engine.conformance import probe_ids
    from desktop_app.engine.loading import wrap_model

    lm = wrap_model(build_family("gemma3", ioi_tokenizer.get_vocab_size()))
    config = lm.model.config
    specials = {config.image_token_index, config.boi_token_index, config.eoi_token_index, 0}
    lm.info = dataclasses.replace(lm.info, n_ctx=400)
    ids = probe_ids(lm, 400).tolist()
    plain = [(i * 7919 + 11) % lm.info.vocab_size for i in range(400)]
    assert set(plain) & specials  # the unguarded spread would hit them
    assert len(ids) == 400 and not set(ids) & specials
