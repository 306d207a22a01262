"""Hook points over the real HF modules: reads agree with the model's own outputs, writes take effect,
hooks never outlive their block; and the tokenisation the user sees."""
import subprocess
import sys

import pytest
import torch

from desktop_app.engine.capture import hooks, run_with_cache, forward_logits
from desktop_app.engine.errors import JobCancelled, PromptError, SpecError
from desktop_app.engine.hooknames import hook_name, parse_hook_name
from desktop_app.engine.jobs import CancelToken

PROMPT = "When Mary and John went to the store, John gave a drink to"


def _all_hooks(lm):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in lm.model.modules())


_baseline = {}


def _hook_count(lm):
    """Hooks beyond those transformers itself installs (once, at the first output_hidden_states call)."""
    if id(lm) not in _baseline:
        with torch.no_grad():
            lm.model(input_ids=torch.tensor([[0, 1]]), output_hidden_states=True, output_attentions=True)
        _baseline[id(lm)] = _all_hooks(lm)
    return _all_hooks(lm) - _baseline[id(lm)]


def test_reads_match_hidden_states_and_reconstruct(tiny_lm):
    lm = tiny_lm
    _hook_count(lm)
    ids = lm.tokenize(PROMPT).ids
    names = [hp.name for hp in lm.hook_points()]
    logits, cache = run_with_cache(lm, ids, names)
    with torch.no_grad():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    assert torch.allclose(logits, out.logits, atol=1e-6)
    for L in range(lm.info.n_layers):
        pre, post = cache[hook_name(L, "resid_pre")], cache[hook_name(L, "resid_post")]
        assert torch.allclose(pre, out.hidden_states[L], atol=1e-6)
        if L + 1 < lm.info.n_layers:  # the last hidden state is after the final norm
            assert torch.allclose(post, out.hidden_states[L + 1], atol=1e-6)
        attn, mlp = cache[hook_name(L, "attn_out")], cache[hook_name(L, "mlp_out")]
        assert torch.allclose(pre + attn + mlp, post, atol=1e-5)
        z = cache[hook_name(L, "attn.hook_z")]
        assert z.shape == (1, len(ids), lm.info.n_heads, lm.info.d_head)
        assert torch.allclose(lm.adapter.o_proj(L)(z.flatten(-2)), attn, atol=1e-5)
        pattern = cache[hook_name(L, "attn.hook_pattern")]
        assert pattern.shape == (1, lm.info.n_heads, len(ids), len(ids))
        assert torch.allclose(pattern.sum(-1), torch.ones(1), atol=1e-5)
        assert float(pattern[0, :, 0, 1:].abs().max()) == 0.0  # causal
        if not lm.info.parallel_attn_mlp:
            assert torch.allclose(cache[hook_name(L, "resid_mid")], pre + attn, atol=1e-6)
    assert torch.allclose(lm.adapter.unembed(cache["ln_final.hook_normalized"]), logits, atol=1e-5)
    assert _hook_count(lm) == 0


def test_gqa_shapes(lm_llama):
    hp = lm_llama.hook_point("blocks.1.attn.hook_z")
    assert hp.shape == (-1, 4, 16) and hp.shape_text() == "[pos, 4, 16]"
    assert {p.group for p in lm_llama.hook_points()} == {"embed", "attention", "mlp", "residual", "final"}
    tree = lm_llama.hook_tree()
    assert tree[0][0] == "embed" and tree[1][0] == "block 0" and tree[-1][0] == "final norm"


def test_neox_has_no_resid_mid(lm_neox):
    assert not any(p.kind == "resid_mid" for p in lm_neox.hook_points())
    with pytest.raises(SpecError, match="parallel"):
        with hooks(lm_neox, read=["blocks.0.hook_resid_mid"]):
            pass


def test_write_zero_attn_out_equals_manual_residual(tiny_lm):
    lm = tiny_lm
    _hook_count(lm)
    ids = torch.tensor([lm.tokenize(PROMPT).ids])
    name = hook_name(lm.info.n_layers - 1, "attn_out")
    _, cache = run_with_cache(lm, ids, [hook_name(lm.info.n_layers - 1, "resid_post"), name])
    with torch.no_grad(), hooks(lm, write={name: torch.zeros_like},
                                read=[hook_name(lm.info.n_layers - 1, "resid_post")]) as store:
        forward_logits(lm, ids)
    post = cache[hook_name(lm.info.n_layers - 1, "resid_post")]
    if lm.info.parallel_attn_mlp:  # the MLP does not see attention: the change is exactly -attn_out
        assert torch.allclose(store[hook_name(lm.info.n_layers - 1, "resid_post")], post - cache[name], atol=1e-5)
    else:
        assert not torch.allclose(store[hook_name(lm.info.n_layers - 1, "resid_post")], post)
    assert _hook_count(lm) == 0


def test_resid_mid_write_identity_is_exact(lm_gpt2):
    ids = torch.tensor([lm_gpt2.tokenize(PROMPT).ids])
    with torch.no_grad():
        ref = forward_logits(lm_gpt2, ids)
        with hooks(lm_gpt2, write={"blocks.0.hook_resid_mid": lambda a: a}):
            same = forward_logits(lm_gpt2, ids)
    assert torch.allclose(ref, same, atol=1e-5)


def test_hooks_removed_on_error_and_cancel(lm_gpt2):
    _hook_count(lm_gpt2)
    ids = torch.tensor([lm_gpt2.tokenize(PROMPT).ids])

    def boom(_act):
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError):
        with hooks(lm_gpt2, write={"blocks.1.hook_resid_pre": boom}):
            forward_logits(lm_gpt2, ids)
    assert _hook_count(lm_gpt2) == 0
    token = CancelToken()
    token.cancel()
    with pytest.raises(JobCancelled):
        with hooks(lm_gpt2, read=["blocks.0.hook_resid_pre"], cancel=token):
            forward_logits(lm_gpt2, ids)
    assert _hook_count(lm_gpt2) == 0


def test_out_of_range_hook(lm_gpt2):
    with pytest.raises(SpecError, match="out of range"):
        with hooks(lm_gpt2, read=["blocks.7.hook_resid_pre"]):
            pass
    with pytest.raises(SpecError):
        lm_gpt2.hook_point("blocks.0.hook_nothing")


def test_hook_names_round_trip():
    for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "attn.hook_z", "attn.hook_pattern"):
        assert parse_hook_name(hook_name(3, kind)) == (3, kind)
    assert hook_name(2, "head_out") == "blocks.2.attn.hook_z"
    with pytest.raises(ValueError):
        parse_hook_name("blocks.x.hook_resid_pre")


def test_tokens_bytelevel(lm_gpt2):
    t = lm_gpt2.tokenize(PROMPT)
    assert not t.bos  # GPT-2's tokenizer does not add BOS by default
    assert "".join(t.strings) == PROMPT
    assert " Mary" in t.strings and "·Mary" in t.display
    assert t.labels()[0].startswith("0: ")
    with_bos = lm_gpt2.tokenize(PROMPT, prepend_bos=True)
    assert with_bos.bos and with_bos.ids[1:] == t.ids
    assert lm_gpt2.is_single_token(" Mary") and not lm_gpt2.is_single_token(" Mary John")


def test_tokens_sentencepiece(stories_dir):
    from desktop_app.engine.loading import load_model
    lm = load_model(stories_dir)
    t = lm.tokenize("Once upon a time,\nthere")
    assert t.bos and t.strings[0] == "<s>"
    assert t.strings[1:4] == [" Once", " upon", " a"]
    assert "↵" in "".join(t.display) or "<0x0A>" in t.display
    assert lm.single_token_id(" Lily") == lm.token_pieces(" Lily").ids[0]


def test_prompt_errors(lm_gpt2):
    with pytest.raises(PromptError, match="empty"):
        lm_gpt2.tokenize("   ")
    with pytest.raises(PromptError, match="context"):
        lm_gpt2.tokenize("Mary " * 2000)
    with pytest.raises(PromptError, match="tokens"):
        lm_gpt2.single_token_id(" Mary and John")


def test_engine_and_project_import_without_qt():
    code = ("import sys; sys.modules['PySide6'] = None; sys.modules['pyqtgraph'] = None; "
            "import desktop_app.engine.loading, desktop_app.engine.capture, desktop_app.engine.patching, "
            "desktop_app.engine.replay, desktop_app.project; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
