"""The tiny models the suite is built on load with plain transformers, offline, and behave as promised."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from desktop_app import demo_task
from gguf_util import write_gguf

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_ioi_examples_are_seeded_pairs_of_equal_token_length(ioi_tokenizer):
    examples = demo_task.ioi_examples(50, seed=3)
    assert examples == demo_task.ioi_examples(50, seed=3)
    assert examples != demo_task.ioi_examples(50, seed=4)
    for ex in examples:
        io, s = ex.answer.strip(), ex.wrong.strip()
        assert io != s and ex.clean.endswith(" to") and ex.corrupted.endswith(" to")
        # the clean prompt names the subject twice, the corrupted prompt names the indirect object twice
        assert ex.clean.count(" " + s + " ") == 2 and ex.clean.count(" " + io + " ") == 1
        assert ex.corrupted.count(" " + io + " ") == 2 and ex.corrupted.count(" " + s + " ") == 1
        clean, corrupted = ioi_tokenizer.encode(ex.clean).ids, ioi_tokenizer.encode(ex.corrupted).ids
        assert len(clean) == len(corrupted)
        assert sum(a != b for a, b in zip(clean, corrupted)) == 1


@pytest.mark.parametrize("fixture", ["gpt2_dir", "llama_dir", "neox_dir", "ioi_gpt2_dir"])
def test_fixture_loads_offline_with_plain_transformers(fixture, request):
    folder = request.getfixturevalue(fixture)
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert model.dtype == torch.float32
    assert len(tok) == model.config.vocab_size
    assert tok.bos_token == "<|endoftext|>" and tok.bos_token_id == 0 == model.config.bos_token_id

    ids = tok(PROMPT)["input_ids"]
    assert ids[0] != tok.bos_token_id  # no BOS added implicitly: callers decide
    assert tok.decode(ids) == PROMPT
    for name in demo_task.NAMES:
        name_ids = tok(" " + name, add_special_tokens=False)["input_ids"]
        assert len(name_ids) == 1 and tok.decode(name_ids) == " " + name

    logits = _logits(model, ids)
    assert logits.shape == (len(ids), model.config.vocab_size)
    assert torch.isfinite(logits).all() and logits[-1].std() > 1e-3


def test_model_shapes(gpt2_dir, llama_dir, neox_dir):
    llama = json.loads((llama_dir / "config.json").read_text())
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (4, 2)
    neox = json.loads((neox_dir / "config.json").read_text())
    assert neox["use_parallel_residual"] is True
    gpt2 = json.loads((gpt2_dir / "config.json").read_text())
    assert gpt2["n_head"] == 4 and gpt2["n_layer"] in (2, 3)


def test_tokenizer_matches_the_trained_one(gpt2_dir, ioi_tokenizer):
    tok = AutoTokenizer.from_pretrained(gpt2_dir, local_files_only=True)
    for ex in demo_task.ioi_examples(20, seed=9):
        assert tok(ex.clean)["input_ids"] == ioi_tokenizer.encode(ex.clean).ids


def test_ioi_model_beats_chance_on_held_out_examples(ioi_gpt2_dir, gpt2_dir):
    tok = AutoTokenizer.from_pretrained(ioi_gpt2_dir, local_files_only=True)
    held_out = demo_task.ioi_examples(200, seed=12345)
    trained = AutoModelForCausalLM.from_pretrained(ioi_gpt2_dir, local_files_only=True)
    untrained = AutoModelForCausalLM.from_pretrained(gpt2_dir, local_files_only=True)

    def accuracy(model):
        wins = 0
        for ex in held_out:  # one forward per prompt: independent of demo_task.ioi_accuracy's batching
            last = _logits(model, tok(ex.clean)["input_ids"])[-1]
            answer, wrong = tok.convert_tokens_to_ids(tok.tokenize(ex.answer) + tok.tokenize(ex.wrong))
            wins += bool(last[answer] > last[wrong])
        return wins / len(held_out)

    acc = accuracy(trained)
    assert acc >= 0.85
    assert abs(acc - demo_task.ioi_accuracy(trained, _raw_tokenizer(ioi_gpt2_dir), held_out)) < 1e-6
    assert accuracy(untrained) < 0.75  # the signal comes from training, not from the task being trivial

    # patching has something to recover: the corrupted prompt flips the logit difference
    clean_ids, corrupt_ids = tok(PROMPT)["input_ids"], tok(PROMPT.replace(", John", ", Mary"))["input_ids"]
    mary, john = tok.convert_tokens_to_ids(tok.tokenize(" Mary") + tok.tokenize(" John"))
    clean, corrupt = _logits(trained, clean_ids)[-1], _logits(trained, corrupt_ids)[-1]
    assert clean[mary] - clean[john] > 1.0 and corrupt[mary] - corrupt[john] < -1.0


def _raw_tokenizer(folder):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("fixture", ["llama_dir", "gpt2_dir"])
def test_gguf_round_trip(fixture, request, tmp_path):
    pytest.importorskip("gguf")
    folder = request.getfixturevalue(fixture)
    out = write_gguf(folder, tmp_path / "gguf" / "tiny.gguf")

    original = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    loaded = AutoModelForCausalLM.from_pretrained(
        out.parent, gguf_file=out.name, local_files_only=True, attn_implementation="eager"
    )
    ref_tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    gguf_tok = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name, local_files_only=True)

    assert type(loaded) is type(original)
    assert loaded.config.vocab_size == original.config.vocab_size
    texts = [PROMPT, "<|endoftext|>Yesterday Alice and Bob met at the cafe.", "  odd   spacing, 42!"]
    for text in texts:
        assert gguf_tok(text)["input_ids"] == ref_tok(text)["input_ids"], text
    assert gguf_tok.decode(gguf_tok(PROMPT)["input_ids"]) == PROMPT

    ids = ref_tok(PROMPT)["input_ids"]
    expected, got = _logits(original, ids), _logits(loaded, ids)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=0)


def test_stories_model_is_a_real_trained_llama(stories_dir):
    model = AutoModelForCausalLM.from_pretrained(stories_dir, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(stories_dir, local_files_only=True)
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = torch.tensor([tok("Once upon a time,")["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Once upon a time, there was a little girl" in tok.decode(out[0], skip_special_tokens=True)
