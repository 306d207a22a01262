"""Load progress moves with the weights: events reach the consumer while from_pretrained is still reading the
shards of a multi-shard model, increase, and a cancel or a consumer that goes away stops the loading thread."""
import re
import shutil
import threading

import pytest
import torch

from desktop_app.engine import loading
from desktop_app.engine.errors import JobCancelled, ModelLoadError
from desktop_app.engine.jobs import CancelToken, Progress

HELPER = "interp-workbench-load-weights"


@pytest.fixture(scope="module")
def sharded_dir(gpt2_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "gpt2"
    AutoModelForCausalLM.from_pretrained(gpt2_dir).save_pretrained(out, max_shard_size="40KB")
    for f in gpt2_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 3 and (out / "model.safetensors.index.json").is_file()
    return out


@pytest.fixture
def watched_load(monkeypatch):
    """Wraps the from_pretrained step; `returned` is set the moment it has returned."""
    returned = threading.Event()
    original = loading._from_pretrained

    def wrapped(*args, **kwargs):
        model = original(*args, **kwargs)
        returned.set()
        return model

    monkeypatch.setattr(loading, "_from_pretrained", wrapped)
    return returned


def _per_tensor(event):
    return isinstance(event, Progress) and re.fullmatch(r"loading weights \d+/\d+", event.message) is not None


def _helpers_alive():
    return [t for t in threading.enumerate() if t.name == HELPER]


def test_weights_progress_arrives_while_the_shards_load(sharded_dir, watched_load):
    job = loading.load_model_job(sharded_dir, dtype="float32", device="cpu")
    events, seen_before_return = [], []
    try:
        while True:
            event = next(job)
            events.append(event)
            if _per_tensor(event):
                seen_before_return.append(not watched_load.is_set())
    except StopIteration as stop:
        lm = stop.value
    assert lm.info.n_layers == 2 and watched_load.is_set()
    weights = [e for e in events if _per_tensor(e)]
    assert len(weights) >= 10
    # the loading thread is at most one event ahead of the consumer: all but the last two arrive before it returns
    assert all(seen_before_return[:-2])
    values = [e.done for e in weights]
    assert values == sorted(set(values)) and 10 <= values[0] and values[-1] <= 85
    everything = [e.done for e in events if isinstance(e, Progress)]
    assert everything == sorted(everything) and everything[0] == 0 and everything[-1] == 100
    assert not _helpers_alive()


def test_cancel_during_the_weights_stops_the_loading_thread(sharded_dir):
    cancel = CancelToken()
    job = loading.load_model_job(sharded_dir, dtype="float32", device="cpu", cancel=cancel)
    n_weights = 0
    with pytest.raises(JobCancelled):
        for event in job:
            if _per_tensor(event):
                n_weights += 1
                if n_weights == 2:
                    cancel.cancel()
    # at most the one event already handed over arrives after the cancel; the 28 tensors are not all read
    assert n_weights in (2, 3) and not _helpers_alive()


def test_a_consumer_that_stops_listening_stops_the_loading_thread(sharded_dir, watched_load):
    job = loading.load_model_job(sharded_dir, dtype="float32", device="cpu")
    for event in job:
        if _per_tensor(event):
            break
    job.close()
    assert not _helpers_alive() and not watched_load.is_set()


def test_an_error_in_the_loading_thread_reaches_the_job(sharded_dir, monkeypatch):
    def broken(*args, **kwargs):
        raise ModelLoadError("the weights are broken in a test.")

    monkeypatch.setattr(loading, "_from_pretrained", broken)
    with pytest.raises(ModelLoadError, match="broken in a test"):
        loading.load_model(sharded_dir, dtype="float32", device="cpu")
    assert not _helpers_alive()


def test_the_loading_thread_uses_the_callers_grad_mode(llama_dir):
    """As when from_pretrained ran in the caller's thread: under the UI worker's inference_mode the buffers built
    at init (rotary inv_freq) are inference tensors, the loaded weights are not."""
    def flags(lm):
        return {name.split(".")[-1]: t.is_inference() for name, t in
                list(lm.model.named_parameters()) + list(lm.model.named_buffers())}

    with torch.inference_mode():
        inside = flags(loading.load_model(llama_dir, dtype="float32", device="cpu"))
    outside = flags(loading.load_model(llama_dir, dtype="float32", device="cpu"))
    assert inside["inv_freq"] and not inside["weight"]
    assert not any(outside.values())
