"""Speed-up of a second SAE training run on the same corpus (activations read from the cache) over the first.

    PYTHONPATH=$PWD python packaging/bench_sae_cache.py [--tokens 20000] [--steps 300] [--layers 12] [--d-model 768]

Builds a GPT-2-shaped model with random weights (default GPT-2-small: 12 layers, d_model 768) and the demo
tokenizer, writes a corpus of the demo task's sentences, and runs sae_training_job twice at the middle layer's
resid_post with a fresh cache folder: the first run collects activations (batched forward passes, stopped after
the hook's block) and trains; the second reads them from the cache and trains. Prints both wall times, the
number of forward passes of each, and the ratios.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--width", type=int, default=2048)
    args = ap.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from desktop_app import demo_task
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import wrap_model
    from desktop_app.engine.sae.jobs import sae_training_job
    from desktop_app.engine.sae.training import TrainConfig

    torch.manual_seed(0)
    tok = demo_task.train_tokenizer(demo_task.corpus(2000, seed=0), vocab_size=512)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo_task.save_hf_tokenizer(tok, tmp / "tok")
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp / "tok"))
        config = GPT2Config(n_positions=1024, n_embd=args.d_model, n_layer=args.layers, n_head=args.d_model // 64,
                            vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0)
        lm = wrap_model(GPT2LMHeadModel(config).float(), tokenizer, path="gpt2-shaped")
        corpus = tmp / "corpus.txt"
        corpus.write_text("\n\n".join(" ".join(demo_task.corpus(8, seed=s)) for s in range(args.tokens // 100 + 50)))
        hook = f"blocks.{args.layers // 2}.hook_resid_post"
        cfg = TrainConfig(architecture="topk", d_sae=args.width, k=32, steps=args.steps, batch_size=1024,
                          log_every=args.steps)
        forwards = [0]
        lm.model.register_forward_pre_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        times, counts = [], []
        for run in ("first", "second"):
            forwards[0] = 0
            t0 = time.perf_counter()
            r = drive(sae_training_job(lm, hook, corpus, cfg, tmp / run, context=128, max_tokens=args.tokens,
                                       cache_dir=tmp / "cache", batch_size=16))
            times.append(time.perf_counter() - t0)
            counts.append(forwards[0])
            print(f"{run} run: {times[-1]:.1f} s, {forwards[0]} forward passes, {r.params['n_tokens']} tokens, "
                  f"EV {float(r.values[-1, r.labels['metric'].index('explained_variance')]):.3f}")
    print(f"GPT-2-shaped model ({args.layers} layers, d_model {args.d_model}), hook {hook}, {args.tokens} tokens, "
          f"{args.steps} steps of 1024, width {args.width}: second run {times[0] / times[1]:.1f}x faster "
          f"({times[0]:.1f} s -> {times[1]:.1f} s; forward passes {counts[0]} -> {counts[1]})")


if __name__ == "__main__":
    main()
