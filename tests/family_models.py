"""Tiny random models of many transformers families, built from their config classes (tests and the bench).

Every model has 2 layers (3 where a family mixes layer types), d_model 64, 4 query heads, grouped-query
attention (2 key/value heads) where the family has it, and a sliding window of 4 tokens (shorter than the test
prompts) where the family has one. `build_family(name, vocab_size)` returns the model in float32.
"""
from __future__ import annotations

D, HEADS, KV, MLP, LAYERS, WINDOW = 64, 4, 2, 128, 2, 4

_LLAMA_LIKE = dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                   num_key_value_heads=KV, max_position_embeddings=256, tie_word_embeddings=False)

# family: (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=256)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      max_position_embeddings=256, use_parallel_residual=True, tie_word_embeddings=False)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM",
             dict(n_embd=D, n_layer=LAYERS, n_head=HEADS, n_positions=256, rotary_dim=8, tie_word_embeddings=False)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=WINDOW)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(_LLAMA_LIKE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(_LLAMA_LIKE, head_dim=16, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(_LLAMA_LIKE, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       decoder_sparse_step=1, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(_LLAMA_LIKE, num_experts=4, num_experts_per_tok=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_LLAMA_LIKE, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",
               dict(_LLAMA_LIKE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                    final_logit_softcapping=5.0, attn_logit_softcapping=20.0)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM",
                    dict(_LLAMA_LIKE, num_hidden_layers=3, head_dim=16, sliding_window=WINDOW,
                         query_pre_attn_scalar=16, final_logit_softcapping=5.0,
                         layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration", {}),  # multimodal: build_gemma3_multimodal
    "phi": ("PhiConfig", "PhiForCausalLM",
            dict(hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 max_position_embeddings=256, partial_rotary_factor=0.5, tie_word_embeddings=False)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(_LLAMA_LIKE, sliding_window=WINDOW, pad_token_id=0)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(_LLAMA_LIKE)),
    "granite": ("GraniteConfig", "GraniteForCausalLM",
                dict(_LLAMA_LIKE, logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=3.0,
                     attention_multiplier=0.2)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(_LLAMA_LIKE, logit_scale=0.5, tie_word_embeddings=True)),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", dict(_LLAMA_LIKE, partial_rotary_factor=0.25)),
    "falcon": ("FalconConfig", "FalconForCausalLM",
               dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, new_decoder_architecture=False,
                    multi_query=True, parallel_attn=True, alibi=False, bias=False, max_position_embeddings=256)),
    "falcon_new": ("FalconConfig", "FalconForCausalLM",  # Falcon-40B/180B: grouped KV heads, two parallel norms
                   dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_kv_heads=KV,
                        new_decoder_architecture=True, num_ln_in_parallel_attn=2, parallel_attn=True, alibi=False,
                        bias=False, max_position_embeddings=256)),
    "falcon_alibi": ("FalconConfig", "FalconForCausalLM",  # Falcon-RW: ALiBi, sequential blocks
                     dict(hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                          bias=True, max_position_embeddings=256)),
    "opt": ("OPTConfig", "OPTForCausalLM",
            dict(hidden_size=D, ffn_dim=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                 word_embed_proj_dim=D, max_position_embeddings=256, do_layer_norm_before=True)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS)),
    # variants whose residual stream is not a sum of sub-layer outputs: attn_out / mlp_out analyses are refused
    "opt_post_ln": ("OPTConfig", "OPTForCausalLM",  # OPT-350m: the layer norms come after the residual additions
                    dict(hidden_size=D, ffn_dim=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         word_embed_proj_dim=D // 2, max_position_embeddings=256, do_layer_norm_before=False)),
    "bloom_ln_residual": ("BloomConfig", "BloomForCausalLM",  # the residual is the layer norm's output
                          dict(hidden_size=D, n_layer=LAYERS, n_head=HEADS,
                               apply_residual_connection_post_layernorm=True)),
}


def build_gemma3_multimodal(vocab_size: int, seed: int = 0, bos_id: int = 0):
    """A Gemma 3 checkpoint with a vision tower (as 4B and up are): Gemma3ForConditionalGeneration. Its image
    tokens lie beyond the tokenizer's vocabulary, so text prompts never contain one."""
    import torch
    import transformers

    text = dict(FAMILIES["gemma3_text"][2], vocab_size=vocab_size + 3, bos_token_id=bos_id, eos_token_id=bos_id,
                pad_token_id=None, initializer_range=0.1)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=vocab_size, boi_token_index=vocab_size + 1,
                                       eoi_token_index=vocab_size + 2, initializer_range=0.1)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    _randomise_vectors(model)
    return model


def _randomise_vectors(model):
    import torch

    with torch.no_grad():  # random norms and biases, so that a missed norm or bias shows in the checks
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)


def build_family(name: str, vocab_size: int, seed: int = 0, bos_id: int = 0):
    import torch
    import transformers

    if name == "gemma3":
        return build_gemma3_multimodal(vocab_size, seed, bos_id)
    config_cls, model_cls, kwargs = FAMILIES[name]
    kwargs = dict(kwargs)
    kwargs.setdefault("pad_token_id", None)
    config = getattr(transformers, config_cls)(vocab_size=vocab_size, bos_token_id=bos_id, eos_token_id=bos_id,
                                               initializer_range=0.1, **kwargs)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    _randomise_vectors(model)
    return model


def main(argv=None) -> int:
    """Print each family's conformance checks and their time, loaded through the real loader (the family table):
    PYTHONPATH=. python tests/family_models.py [family ...]"""
    import statistics
    import sys
    import tempfile
    import time
    from pathlib import Path

    from desktop_app import demo_task
    from desktop_app.engine.conformance import check_model
    from desktop_app.engine.loading import load_model

    names = (argv if argv is not None else sys.argv[1:]) or list(FAMILIES)
    tok = demo_task.train_tokenizer(demo_task.corpus(300, seed=0), vocab_size=512)
    print(f"{'family':17s} {'adapter':12s} {'form':10s} {'at load ms':>10s} {'median ms':>9s} {'cpu ms':>6s}  result")
    with tempfile.TemporaryDirectory() as root:
        for name in names:
            folder = Path(root) / name
            build_family(name, tok.get_vocab_size()).save_pretrained(folder)
            demo_task.save_hf_tokenizer(tok, folder)
            lm = load_model(folder, dtype="float32", device="cpu")
            times, cpu = [], []
            for _ in range(5):  # wall time, and this process's CPU time (less sensitive to a busy machine)
                t0, c0 = time.perf_counter(), time.process_time()
                check_model(lm)
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
            conf = lm.conformance
            failed = [f"{c.name} ({c.describe()})" for c in conf.failed()]
            form = "parallel" if lm.adapter.parallel_attn_mlp else "sequential"
            print(f"{name:17s} {conf.family:12s} {form:10s} {conf.total_ms:10.1f} {statistics.median(times):9.1f} "
                  f"{statistics.median(cpu):6.1f}  "
                  f"{'all 6 checks pass' if not failed else 'failed: ' + '; '.join(failed)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
