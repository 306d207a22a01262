"""The dataset sweep's fast paths against one plain forward pass per cell: the last block computed for the last
position only (the keys and values of the others), the unembedding of the metric's tokens only, patches in the
last block that cannot reach the last position, and the fall-backs when a fast path does not hold."""
import numpy as np
import pytest
import torch

from desktop_app.engine import dataset_patching, replay
from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.dataset_patching import dataset_patching_job
from desktop_app.engine.datasets import dataset_from_list, tokenize_dataset
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import drive
from desktop_app.engine.metric_expr import MetricExpression

from test_dataset_patching import aligned_items


def reference(lm, data, component, positions, metric=None):
    """values_per_pair by one plain forward pass of the corrupted prompt per (pair, cell), the clean run's slice
    written in (denoising); metric(logits [vocab], pair) -> float, logit_diff by default."""
    metric = metric or (lambda logits, p: float(logits[p.answer_ids[0]] - logits[p.wrong_ids[0]]))
    kind = "attn.hook_z" if component == "head_out" else component
    n, n_pos, heads = lm.info.n_layers, len(data.pairs[0].clean.ids), lm.info.n_heads
    out = []
    for p in data.pairs:
        names = [hook_name(L, kind) for L in range(n)]
        with torch.no_grad(), hooks(lm, read=names) as clean:
            forward_logits(lm, torch.tensor([p.clean.ids]))
        shape = [n] + ([n_pos] if positions == "each" else []) + ([heads] if component == "head_out" else [])
        values = np.zeros(shape)
        for idx in np.ndindex(*shape):
            pos = idx[1] if positions == "each" else slice(None)
            where = (slice(None), pos) + ((idx[-1],) if component == "head_out" else ())
            name = names[idx[0]]

            def patch(act, name=name, where=where):
                act = act.clone()
                act[where] = clean[name][where]
                return act
            with torch.no_grad(), hooks(lm, write={name: patch}):
                logits = forward_logits(lm, torch.tensor([p.corrupted.ids]))[0, -1].float()
            values[idx] = metric(logits, p)
        out.append(values)
    return np.stack(out)


@pytest.fixture(scope="module")
def datasets():
    return {}


def dataset(lm, cache):
    if id(lm) not in cache:
        cache[id(lm)] = tokenize_dataset(lm, dataset_from_list(aligned_items(lm, n=3)))
    return cache[id(lm)]


@pytest.mark.parametrize("component,positions", [
    ("resid_pre", "each"), ("head_out", "all"), ("head_out", "each"), ("attn_out", "each"), ("mlp_out", "all"),
    ("resid_post", "each")])
def test_fast_sweep_equals_a_forward_pass_per_cell(tiny_lm, datasets, component, positions):
    data = dataset(tiny_lm, datasets)
    n = tiny_lm.info.n_layers
    with torch.inference_mode():
        run = replay.record_run(tiny_lm, data.pairs[0].corrupted.ids, [hook_name(L, "attn.hook_z") for L in range(n)])
    # the fast paths are in use on every tiny family
    assert replay.last_block_check(tiny_lm, run)
    assert all(replay.given_attention_check(tiny_lm, run, L) for L in range(n))
    got = drive(dataset_patching_job(tiny_lm, data, component, positions, "denoise", "logit_diff", batch_size=4))
    np.testing.assert_allclose(got.extras["values_per_pair"], reference(tiny_lm, data, component, positions),
                               atol=1e-5, rtol=0)


def test_columns_are_planned_only_for_logit_metrics(lm_llama, datasets):
    from desktop_app.engine.pair_metrics import DatasetMetric

    data = dataset(lm_llama, datasets)
    with torch.inference_mode():
        runs = [replay.record_run(lm_llama, p.corrupted.ids) for p in data.pairs]
    block = list(range(len(data.pairs)))
    for metric, planned in (("logit_diff", True), ("logit_diff_recovered", True), ("kl_div", False),
                            ("answer_prob", False), (MetricExpression("logit(answer) - 2 * logit(' Mary')"), True),
                            (MetricExpression("logprob(answer) - logit(wrong)"), False)):
        plan = dataset_patching._Columns.plan(lm_llama, DatasetMetric(lm_llama, metric, data.pairs), block, runs)
        assert (plan is not None) == planned, metric


@pytest.mark.parametrize("expression", ["logit(answer) - 2 * logit(' Mary') + logit(wrong)",
                                        "logprob(answer) - logit(wrong)"])
def test_expressions_equal_a_forward_pass_per_cell(lm_neox, datasets, expression):
    data = dataset(lm_neox, datasets)
    mary = lm_neox.single_token_id(" Mary")

    def by_hand(logits, p):
        lp = torch.log_softmax(logits, -1)
        first = logits[p.answer_ids[0]] - 2 * logits[mary] + logits[p.wrong_ids[0]] if expression.startswith("logit") \
            else lp[p.answer_ids[0]] - logits[p.wrong_ids[0]]
        return float(first)
    got = drive(dataset_patching_job(lm_neox, data, "head_out", "all", "denoise", MetricExpression(expression)))
    np.testing.assert_allclose(got.extras["values_per_pair"], reference(lm_neox, data, "head_out", "all", by_hand),
                               atol=1e-5, rtol=0)


def test_run_rows_with_the_last_block_for_the_last_position(lm_gpt2, datasets):
    """Rows of different prompts, each with its own prefix keys and values, from the middle position."""
    data = dataset(lm_gpt2, datasets)
    n = lm_gpt2.info.n_layers
    with torch.inference_mode():
        runs = [replay.record_run(lm_gpt2, p.clean.ids) for p in data.pairs]
        start = runs[0].n_pos // 2
        for layer in range(n):
            hidden = torch.cat([r.resid_pre[layer][:, start:] for r in runs])
            prefix = [(torch.cat([r.prefix_kv[L][0][:, :, :start] for r in runs]),
                       torch.cat([r.prefix_kv[L][1][:, :, :start] for r in runs])) for L in range(n)]
            for fast in (False, True):
                out = replay.run_rows(lm_gpt2, runs[0], layer, hidden, start, prefix, last_block_last_only=fast)
                ref = torch.cat([r.resid_post(n - 1)[:, -1] for r in runs])
                assert float((out - ref).abs().max()) < 1e-5


def test_fallbacks_stay_exact(lm_llama, datasets, monkeypatch):
    """Were the last-block shortcut or the column unembedding not to hold for a model, the full computation runs."""
    data = dataset(lm_llama, datasets)
    ref = reference(lm_llama, data, "resid_pre", "each")
    monkeypatch.setattr(dataset_patching, "last_block_check", lambda lm, run: False)
    monkeypatch.setattr(dataset_patching, "unembed_columns", lambda lm, final, ids: None)
    monkeypatch.setattr(dataset_patching, "given_attention_check", lambda lm, run, layer: False)
    got = drive(dataset_patching_job(lm_llama, data, "resid_pre", "each", "denoise", "logit_diff"))
    np.testing.assert_allclose(got.extras["values_per_pair"], ref, atol=1e-5, rtol=0)
    got = drive(dataset_patching_job(lm_llama, data, "head_out", "all", "denoise", "logit_diff"))
    np.testing.assert_allclose(got.extras["values_per_pair"], reference(lm_llama, data, "head_out", "all"),
                               atol=1e-5, rtol=0)


def test_attention_that_adds_the_residual_itself_is_computed(ioi_tokenizer):
    """Bloom's attention module adds the residual stream itself: its output is not the output projection of
    hook_z, the check says so, and head_out sweeps compute the attention (and stay exact)."""
    from transformers import PreTrainedTokenizerFast

    from desktop_app import demo_task
    from desktop_app.engine.loading import wrap_model
    from family_models import build_family

    tok = PreTrainedTokenizerFast(tokenizer_object=ioi_tokenizer, bos_token=demo_task.BOS_TOKEN)
    lm = wrap_model(build_family("bloom", ioi_tokenizer.get_vocab_size()), tok)
    data = tokenize_dataset(lm, dataset_from_list(aligned_items(lm, n=2)))
    n = lm.info.n_layers
    with torch.inference_mode():
        run = replay.record_run(lm, data.pairs[0].corrupted.ids, [hook_name(L, "attn.hook_z") for L in range(n)])
    assert not any(replay.given_attention_check(lm, run, L) for L in range(n))
    assert replay.last_block_check(lm, run)
    got = drive(dataset_patching_job(lm, data, "head_out", "all", "denoise", "logit_diff"))
    np.testing.assert_allclose(got.extras["values_per_pair"], reference(lm, data, "head_out", "all"),
                               atol=1e-5, rtol=0)


def test_a_broken_column_unembedding_is_caught(lm_gpt2, datasets, monkeypatch):
    """Columns that differ from the recorded logits are not used (the check compares them, it does not trust)."""
    data = dataset(lm_gpt2, datasets)
    real = replay.unembed_columns
    monkeypatch.setattr(dataset_patching, "unembed_columns", lambda lm, final, ids: real(lm, final, ids) + 0.01)
    from desktop_app.engine.pair_metrics import DatasetMetric
    with torch.inference_mode():
        runs = [replay.record_run(lm_gpt2, p.corrupted.ids) for p in data.pairs]
    measure = DatasetMetric(lm_gpt2, "logit_diff", data.pairs)
    assert dataset_patching._Columns.plan(lm_gpt2, measure, list(range(len(data.pairs))), runs) is None
    got = drive(dataset_patching_job(lm_gpt2, data, "resid_pre", "each", "denoise", "logit_diff"))
    np.testing.assert_allclose(got.extras["values_per_pair"], reference(lm_gpt2, data, "resid_pre", "each"),
                               atol=1e-5, rtol=0)


def test_the_run_time_checks_refuse_a_shortcut_that_does_not_hold(lm_gpt2, datasets, monkeypatch):
    """The last-block and given-attention checks measure, they do not trust: a shortcut off by 0.01 is refused."""
    import weakref

    data = dataset(lm_gpt2, datasets)
    n = lm_gpt2.info.n_layers
    with torch.inference_mode():
        run = replay.record_run(lm_gpt2, data.pairs[0].corrupted.ids, [hook_name(L, "attn.hook_z") for L in range(n)])
    monkeypatch.setattr(replay, "_LAST_BLOCK_OK", weakref.WeakKeyDictionary())
    monkeypatch.setattr(replay, "_GIVEN_ATTENTION_OK", weakref.WeakKeyDictionary())
    assert replay.last_block_check(lm_gpt2, run) and replay.given_attention_check(lm_gpt2, run, 0)
    real_last, real_given = replay._last_block_last_position, replay.run_block_given_attention
    monkeypatch.setattr(replay, "_last_block_last_position", lambda *a: real_last(*a) + 0.01)
    monkeypatch.setattr(replay, "run_block_given_attention", lambda *a, **k: real_given(*a, **k) + 0.01)
    monkeypatch.setattr(replay, "_LAST_BLOCK_OK", weakref.WeakKeyDictionary())
    monkeypatch.setattr(replay, "_GIVEN_ATTENTION_OK", weakref.WeakKeyDictionary())
    assert not replay.last_block_check(lm_gpt2, run)
    assert not replay.given_attention_check(lm_gpt2, run, 0)
