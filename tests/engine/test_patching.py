"""Activation patching sweeps against an independent reference: one plain forward pass per cell."""
import numpy as np
import pytest
import torch

from desktop_app.engine import patching
from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.hooknames import hook_name
from desktop_app.engine.jobs import CancelToken, Partial, drive
from desktop_app.engine.patching import activation_patching_job
from desktop_app.engine.prompts import prepare_pair

CLEAN = "When Mary and John went, John gave a drink to"
CORRUPTED = "When Mary and John went, Mary gave a drink to"


IOI_CLEAN = "When Mary and John went to the store, John gave a drink to"  # a training template of lm_ioi
IOI_CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


@pytest.fixture
def pair_of():
    """Short prompts for the random tiny models (fast references), the template for the trained one."""
    def make(lm):
        if "ioi" in lm.path:
            return prepare_pair(lm, IOI_CLEAN, IOI_CORRUPTED, " Mary", " John")
        return prepare_pair(lm, CLEAN, CORRUPTED, " Mary", " John")
    return make


def reference_sweep(lm, pair, component, direction, metric, per_position):
    """Naive TransformerLens semantics: run the target prompt once per cell with one slice replaced."""
    src_ids, tgt_ids = (pair.clean.ids, pair.corrupted.ids) if direction == "denoise" else \
        (pair.corrupted.ids, pair.clean.ids)
    kind = "attn.hook_z" if component == "head_out" else component
    names = [hook_name(L, kind) for L in range(lm.info.n_layers)]
    with torch.no_grad():
        with hooks(lm, read=names) as store:
            forward_logits(lm, torch.tensor([src_ids]))
        clean = forward_logits(lm, torch.tensor([pair.clean.ids]))[0, -1]
        corrupted = forward_logits(lm, torch.tensor([pair.corrupted.ids]))[0, -1]
    a, w = pair.answer_id, pair.wrong_id
    ld_clean, ld_corr = float(clean[a] - clean[w]), float(corrupted[a] - corrupted[w])

    def measure(logits):
        if metric == "logit_diff":
            return float(logits[a] - logits[w])
        if metric == "logit_diff_recovered":
            return (float(logits[a] - logits[w]) - ld_corr) / (ld_clean - ld_corr)
        if metric == "answer_prob":
            return float(torch.softmax(logits, -1)[a])
        p, q = torch.log_softmax(clean, -1), torch.log_softmax(logits, -1)
        return float((p.exp() * (p - q)).sum())

    shape = [lm.info.n_layers] + ([pair.n_pos] if per_position else []) + \
        ([lm.info.n_heads] if component == "head_out" else [])
    out = np.zeros(shape)
    for idx in np.ndindex(*shape):
        layer, name = idx[0], names[idx[0]]
        pos = idx[1] if per_position else slice(None)
        head = idx[-1] if component == "head_out" else None

        def patch(act, name=name, pos=pos, head=head):
            act = act.clone()
            where = (slice(None), pos) if head is None else (slice(None), pos, head)
            act[where] = store[name][where]
            return act
        with torch.no_grad(), hooks(lm, write={name: patch}):
            out[idx] = measure(forward_logits(lm, torch.tensor([tgt_ids]))[0, -1])
    return out


@pytest.mark.parametrize("component", patching.COMPONENTS)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_sweeps_equal_reference(tiny_lm, pair_of, component, direction):
    lm = tiny_lm
    if component == "resid_mid" and lm.info.parallel_attn_mlp:
        pytest.skip("no resid_mid in a parallel-residual model")
    pair = pair_of(lm)
    for positions in ("each", "all"):
        result = drive(activation_patching_job(lm, pair, component, positions, direction, "logit_diff",
                                               batch_size=5))
        expected = reference_sweep(lm, pair, component, direction, "logit_diff", positions == "each")
        assert result.status == "complete" and result.values.shape == expected.shape
        np.testing.assert_allclose(result.values, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("metric", ["logit_diff_recovered", "answer_prob", "kl_div"])
def test_metrics_equal_reference(lm_ioi, pair_of, metric):
    pair = pair_of(lm_ioi)
    result = drive(activation_patching_job(lm_ioi, pair, "resid_pre", "each", "denoise", metric))
    expected = reference_sweep(lm_ioi, pair, "resid_pre", "denoise", metric, True)
    np.testing.assert_allclose(result.values, expected, atol=1e-5, rtol=1e-5)


def test_known_structure_layer0(lm_ioi, pair_of):
    """Only one token differs: patching it at layer 0 makes the run clean (1), any other position does nothing (0)."""
    pair = pair_of(lm_ioi)
    differing = [i for i, (a, b) in enumerate(zip(pair.clean.ids, pair.corrupted.ids)) if a != b]
    assert len(differing) == 1
    for direction in ("denoise", "noise"):
        result = drive(activation_patching_job(lm_ioi, pair, "resid_pre", "each", direction, "logit_diff_recovered"))
        row = result.values[0]
        assert row[differing[0]] == pytest.approx(1.0 if direction == "denoise" else 0.0, abs=1e-5)
        others = np.delete(row, differing[0])
        assert np.allclose(others, 0.0 if direction == "denoise" else 1.0, atol=1e-5)
    assert result.labels["position"][differing[0]].endswith("John")
    assert result.clean_metric == pytest.approx(1.0) and result.corrupted_metric == pytest.approx(0.0)
    assert result.clean_metric != result.corrupted_metric


def test_trained_model_has_a_signal(lm_ioi, pair_of):
    result = drive(activation_patching_job(lm_ioi, pair_of(lm_ioi), "resid_pre", "each", "denoise", "logit_diff"))
    assert result.clean_metric > 1.0 > 0 > -1.0 > result.corrupted_metric


def test_streams_partials_and_cancel_keeps_cells(lm_gpt2, pair_of):
    pair = pair_of(lm_gpt2)
    token = CancelToken()
    seen = []

    def on_event(event):
        if isinstance(event, Partial):
            seen.append(event)
            if len(seen) == 3:
                token.cancel()
    result = drive(activation_patching_job(lm_gpt2, pair, "head_out", "each", "denoise", "logit_diff",
                                           cancel=token, batch_size=4), on_event)
    assert result.status == "partial" and "cancelled" in result.message
    done = np.isfinite(result.values)
    # the shared-prefix cells (no forward pass needed) arrive first, then chunks of four; nothing after the cancel
    assert done.sum() == sum(len(e.values) for e in seen) < done.size
    assert [len(e.values) for e in seen[1:]] == [4, 4]
    full = drive(activation_patching_job(lm_gpt2, pair, "head_out", "each", "denoise", "logit_diff"))
    np.testing.assert_allclose(result.values[done], full.values[done], atol=1e-6)
    for event in seen:
        np.testing.assert_allclose(result.values[event.index], event.values)


def test_out_of_memory_shrinks_the_batch(lm_gpt2, pair_of, monkeypatch):
    real = patching._chunk_logits
    sizes = []

    def fake(lm, target, source, component, layer, cells, cancel):
        sizes.append(len(cells))
        if len(cells) > 3:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(lm, target, source, component, layer, cells, cancel)
    monkeypatch.setattr(patching, "_chunk_logits", fake)
    pair = pair_of(lm_gpt2)
    result = drive(activation_patching_job(lm_gpt2, pair, "head_out", "each", "denoise", "logit_diff",
                                           batch_size=16))
    assert result.status == "complete" and np.isfinite(result.values).all()
    assert sizes[:3] == [16, 8, 4] and max(sizes[3:]) <= 3


def test_bad_inputs(lm_gpt2):
    with pytest.raises(PromptError) as err:
        prepare_pair(lm_gpt2, CLEAN, "When Mary went to the store, Mary gave a drink to", " Mary", " John")
    assert "clean:" in str(err.value) and "corrupted:" in str(err.value)
    with pytest.raises(PromptError, match="tokens"):
        prepare_pair(lm_gpt2, CLEAN, CORRUPTED, " Mary Mary", " John")
    with pytest.raises(PromptError, match="same token"):
        prepare_pair(lm_gpt2, CLEAN, CORRUPTED, " Mary", " Mary")
    pair = prepare_pair(lm_gpt2, CLEAN, CORRUPTED, " Mary", " John")
    with pytest.raises(SpecError, match="out of range"):
        drive(activation_patching_job(lm_gpt2, pair, "resid_pre", layers=[0, 5]))
    with pytest.raises(SpecError, match="component"):
        drive(activation_patching_job(lm_gpt2, pair, "resid_sideways"))


def test_equal_clean_and_corrupted_returns_raw(lm_gpt2):
    pair = prepare_pair(lm_gpt2, CLEAN, CLEAN, " Mary", " John")
    result = drive(activation_patching_job(lm_gpt2, pair, "resid_pre", "each", "denoise", "logit_diff_recovered"))
    assert "undefined" in result.message
    assert np.allclose(result.values, result.clean_metric, atol=1e-5)


def test_rows_start_at_the_first_patched_position(tiny_lm, pair_of):
    """The reference comparisons above go through the shortcut that runs only the positions from the first
    patched one on (reusing the recorded keys and values): check that it is really taken, and exact."""
    from desktop_app.engine.replay import can_start_later, record_run, run_from_layer

    lm, pair = tiny_lm, pair_of(tiny_lm)
    run = record_run(lm, pair.corrupted.ids)
    assert all(can_start_later(run, L) for L in range(lm.info.n_layers))
    with torch.inference_mode():
        full = run_from_layer(lm, run, 1, run.resid_pre[1])
        for start in (1, 4, pair.n_pos - 1):
            suffix = run_from_layer(lm, run, 1, run.resid_pre[1][:, start:], start=start)
            torch.testing.assert_close(suffix, full, atol=1e-5, rtol=0)
    torch.testing.assert_close(full[0], run.logits_last, atol=1e-5, rtol=0)
