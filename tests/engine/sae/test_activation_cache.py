"""The activation cache: equal to a plain capture per document, re-used without any forward pass, invalidated by
another model, hook or corpus, and resumed after a cancel without recomputing what was kept."""
import copy

import numpy as np
import pytest
import torch

from desktop_app import demo_task
from desktop_app.engine.capture import run_with_cache
from desktop_app.engine.errors import JobCancelled
from desktop_app.engine.jobs import CancelToken, Progress, drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.sae import corpus as corpus_mod
from desktop_app.engine.sae.activation_cache import (collect_activations_cached, default_cache_dir,
                                                     model_fingerprint)
from desktop_app.engine.sae.jobs import sae_training_job
from desktop_app.engine.sae.training import TrainConfig

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def lm(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def docs(lm):
    return corpus_mod.tokenize_documents(lm, demo_task.corpus(40, seed=5), context=16)


class ForwardCounter:
    """Counts forward passes of the whole model (started) and of each block (finished)."""

    def __init__(self, lm):
        self.model = 0
        self.blocks = [0] * len(lm.adapter.blocks)
        self.handles = [lm.model.register_forward_pre_hook(lambda *_: self._add_model())]
        for i, block in enumerate(lm.adapter.blocks):
            self.handles.append(block.register_forward_hook(lambda *_, i=i: self._add_block(i)))

    def _add_model(self):
        self.model += 1

    def _add_block(self, i):
        self.blocks[i] += 1

    def close(self):
        for h in self.handles:
            h.remove()


def collect(lm, docs, tmp_path, hook=HOOK, cancel=None, on_event=None, **kw):
    counter = ForwardCounter(lm)
    try:
        cache = drive(collect_activations_cached(lm, hook, docs, 16, cache_dir=tmp_path, cancel=cancel, **kw),
                      on_event)
    finally:
        counter.close()
    return cache, counter


def test_cached_rows_equal_a_plain_capture_per_document(lm, docs, tmp_path):
    cache, counter = collect(lm, docs, tmp_path, batch_size=8, shard_bytes=20_000)
    assert cache.complete and len(cache.manifest["shards"]) > 2  # several shards, memory bounded by one
    assert counter.model == (len(docs) + 7) // 8  # many sequences per forward pass
    assert counter.blocks[1] == 0  # stopped after block 0, which produces the hook
    expected = []
    for d in docs:
        _, c = run_with_cache(lm, [d], [HOOK])
        expected.append(c[HOOK][0].numpy())
    rows = cache.rows()
    assert len(rows) == sum(len(d) for d in docs)
    np.testing.assert_allclose(rows.rows(torch.arange(len(rows))).numpy(), np.concatenate(expected), atol=1e-5)
    batch = cache.doc_batch(3, 7)
    for i, d in enumerate(range(3, 7)):
        np.testing.assert_allclose(batch[i, :len(docs[d])].numpy(), expected[d], atol=1e-5)
        assert not batch[i, len(docs[d]):].any()
    # rows without the special tokens (BOS) skip exactly those rows
    ids = np.concatenate([np.array(d) for d in docs])
    kept = cache.rows(skip_ids=corpus_mod.special_ids(lm))
    assert len(kept) == int((~np.isin(ids, list(corpus_mod.special_ids(lm)))).sum())
    keep_idx = np.nonzero(~np.isin(ids, list(corpus_mod.special_ids(lm))))[0]
    np.testing.assert_allclose(kept.rows(torch.arange(5)).numpy(), np.concatenate(expected)[keep_idx[:5]], atol=1e-5)


def test_second_run_uses_no_forward_pass_and_changes_invalidate(lm, docs, tmp_path):
    first, c1 = collect(lm, docs, tmp_path)
    assert c1.model > 0
    again, c2 = collect(lm, docs, tmp_path)
    assert c2.model == 0 and again.folder == first.folder
    other_hook, c3 = collect(lm, docs, tmp_path, hook="blocks.1.hook_resid_post")
    assert c3.model > 0 and other_hook.folder != first.folder
    other_docs, c4 = collect(lm, docs[:-1], tmp_path)
    assert c4.model > 0 and other_docs.folder != first.folder
    changed = copy.deepcopy(lm)
    with torch.no_grad():
        changed.adapter.blocks[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert model_fingerprint(changed) != model_fingerprint(lm)
    other_model, c5 = collect(changed, docs, tmp_path)
    assert c5.model > 0 and other_model.folder != first.folder


def test_cancel_keeps_finished_shards_and_a_later_run_resumes(lm, docs, tmp_path):
    cancel = CancelToken()
    seen = []

    def on_event(e):
        if isinstance(e, Progress):
            seen.append(e)
            if len(seen) == 4:
                cancel.cancel()

    with pytest.raises(JobCancelled):
        collect(lm, docs, tmp_path, batch_size=4, shard_bytes=1, cancel=cancel, on_event=on_event)
    messages = [e.message for e in seen]
    assert "left" in messages[2]  # progress states the time left once a batch has been timed
    resumed, counter = collect(lm, docs, tmp_path, batch_size=4, shard_bytes=1)
    n_batches = (len(docs) + 3) // 4
    assert 0 < counter.model == n_batches - 3  # three batches were kept on disk
    fresh, _ = collect(lm, docs, tmp_path / "fresh", batch_size=4)
    a, b = resumed.rows(), fresh.rows()
    np.testing.assert_array_equal(a.rows(torch.arange(len(a))).numpy(), b.rows(torch.arange(len(b))).numpy())


def test_training_on_the_cache_runs_no_forward_pass(lm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(60, seed=2)))
    cfg = TrainConfig(architecture="topk", d_sae=32, k=4, steps=30, batch_size=128, log_every=10)
    runs = []
    for out in ("a", "b"):
        counter = ForwardCounter(lm)
        try:
            r = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / out, cache_dir=tmp_path / "cache"))
        finally:
            counter.close()
        runs.append((r, counter.model))
    (first, n1), (second, n2) = runs
    assert n1 > 0 and n2 == 0
    assert first.params["activation_cache"] == second.params["activation_cache"]
    np.testing.assert_array_equal(first.values, second.values)
    # the in-memory path (no cache) trains on the same activations: same curves
    mem = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "c", cache_dir=False))
    np.testing.assert_allclose(mem.values, first.values, rtol=1e-5, atol=1e-6)


def test_default_location_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INTERP_WORKBENCH_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "activations"
    monkeypatch.delenv("INTERP_WORKBENCH_CACHE_DIR")
    assert "interp-workbench" in str(default_cache_dir())


def test_training_job_resumes_from_its_checkpoints(lm, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(60, seed=2)))
    cfg = TrainConfig(architecture="topk", d_sae=32, k=4, steps=40, batch_size=128, log_every=10,
                      checkpoint_every=20)
    cache = tmp_path / "cache"
    whole = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "whole", cache_dir=cache))
    cancel = CancelToken()
    stop = lambda e: cancel.cancel() if type(e).__name__ == "TrainMetrics" and e.step >= 10 else None  # noqa: E731
    part = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "part", cache_dir=cache, cancel=cancel), stop)
    assert part.status == "partial" and part.params["checkpoint"].endswith("ckpt-00000010")
    resumed = drive(sae_training_job(lm, HOOK, corpus, cfg, tmp_path / "part", cache_dir=cache,
                                     resume_from=tmp_path / "part" / "checkpoints"))
    assert resumed.status == "complete" and resumed.params["resumed_from"] == 10
    np.testing.assert_array_equal(resumed.values, whole.values)
    from safetensors.numpy import load_file
    a = load_file(str(tmp_path / "whole" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "part" / "sae_weights.safetensors"))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    import json
    meta = json.loads((tmp_path / "whole" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == HOOK and meta["context_size"] == 128 and meta["model_name"] == "gpt2"
    assert meta["model_fingerprint"] == lm.config_hash and meta["norm_scaling_factor_folded"] > 0


def test_dashboards_reuse_the_cache_and_equal_a_direct_scan(lm, tmp_path):
    from desktop_app.engine.sae.dashboards import build_dashboards_job, dashboards_to_list
    from desktop_app.engine.sae.formats import save_saelens
    from sae_helpers import random_sae

    folder = save_saelens(random_sae(HOOK, d_sae=12, seed=1), tmp_path / "sae")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(demo_task.corpus(30, seed=4)))
    out = []
    for cache_dir in (tmp_path / "cache", tmp_path / "cache", False):
        counter = ForwardCounter(lm)
        try:
            dash = drive(build_dashboards_job(lm, folder, corpus, n_top=3, context=2, batch_size=8,
                                              cache_dir=cache_dir))
        finally:
            counter.close()
        out.append((dashboards_to_list(dash), counter.model))
    (first, n1), (second, n2), (direct, n3) = out
    assert n1 > 0 and n2 == 0 and n3 > 0
    assert second == first
    for a, b in zip(first, direct):
        assert a["density"] == b["density"] and a["histogram_counts"] == b["histogram_counts"]
        assert [c["tokens"] for c in a["top_contexts"]] == [c["tokens"] for c in b["top_contexts"]]
        np.testing.assert_allclose([c["activation"] for c in a["top_contexts"]],
                                   [c["activation"] for c in b["top_contexts"]], atol=1e-5)
