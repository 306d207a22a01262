"""Time and peak memory of an attribution graph: fits TopK transcoders on the model's own MLPs (demo-task corpus),
then builds and prunes the graph of one prompt.

    PYTHONPATH=$PWD python -m desktop_app.bench_graph resources/demo/model [--out FOLDER]
    PYTHONPATH=$PWD python -m desktop_app.bench_graph resources/demo/model --gpt2-small-shape

The second builds a randomly initialised model of GPT-2 small's shape (12 layers, d_model 768, vocabulary 50257)
with the demo tokenizer and random TopK transcoders (width 6144, k 32; not fitted: the error nodes carry what
they miss), for the time and memory of a graph of that shape only.
"""
from __future__ import annotations

import argparse
import resource
import time


def main(argv=None) -> int:
    import torch

    from desktop_app import demo_task
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoders import fit_transcoders, save_transcoder_set

    p = argparse.ArgumentParser(prog="bench_graph")
    p.add_argument("model")
    p.add_argument("--prompt", default="When Mary and John went to the store, John gave a drink to")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default=None, help="also write the transcoder set here")
    p.add_argument("--gpt2-small-shape", action="store_true")
    args = p.parse_args(argv)
    if args.gpt2_small_shape:
        return _gpt2_small_shape(args)
    lm = load_model(args.model, dtype="float32", device="cpu")
    texts = demo_task.corpus(400, seed=3)
    ids = [lm.tokenize(t, True).ids for t in texts]
    n = min(len(i) for i in ids)
    batches = [torch.tensor([i[:n] for i in ids[j:j + 50]]) for j in range(0, len(ids), 50)]
    t0 = time.perf_counter()
    tset = drive(fit_transcoders(lm, batches, d_transcoder=args.width, k=args.k, steps=args.steps))
    fit_s = time.perf_counter() - t0
    if args.out:
        save_transcoder_set(tset, args.out, model_name="interp-workbench-demo")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = drive(attribution_graph_job(lm, lm.tokenize(args.prompt, True), "", tset=tset))
    graph_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ex = result.extras
    print(f"model: {lm.info.summary()}")
    print(f"transcoders: width {args.width}, k {args.k}, {args.steps} steps, fitted in {fit_s:.1f} s; explained "
          f"variance per layer {[round(v, 3) for v in tset.config['explained_variance']]}")
    print(f"graph: {len(lm.tokenize(args.prompt, True).ids)} tokens, {len(ex['node_ids'])} nodes kept, "
          f"{int((ex['adjacency'] != 0).sum())} edges kept, built in {graph_s:.2f} s")
    print(f"replacement score {float(ex['replacement_score']):.3f}, completeness {float(ex['completeness_score']):.3f},"
          f" max |replacement - real logit| {float(ex['max_replacement_logit_diff']):.2g}")
    print(f"peak RSS {rss1 / 1024:.0f} MiB (before the graph {rss0 / 1024:.0f} MiB)")
    return 0


def _gpt2_small_shape(args) -> int:
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoders import Transcoder, TranscoderSet

    torch.manual_seed(0)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shape"
        cfg = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                         attn_implementation="eager")
        GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
        for f in Path(args.model).glob("*token*"):
            shutil.copy(f, folder / f.name)
        lm = load_model(str(folder), dtype="float32", device="cpu")
    width, k, d = 6144, 32, 768
    gen = torch.Generator().manual_seed(0)
    layers = [Transcoder(torch.randn(width, d, generator=gen) / d ** 0.5, torch.randn(width, d, generator=gen) * 0.02,
                         torch.zeros(width), torch.zeros(d), "topk", None, k) for _ in range(12)]
    tokens = lm.tokenize(args.prompt, True)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    def show(event):
        if getattr(event, "message", ""):
            print(f"{time.perf_counter() - t0:7.1f} s  {event.message}", flush=True)
    result = drive(attribution_graph_job(lm, tokens, "", tset=TranscoderSet(layers, {})), show)
    graph_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ex = result.extras
    print(f"model: {lm.info.summary()} (random weights)")
    print(f"graph: {len(tokens.ids)} tokens, {12 * len(tokens.ids) * k} active features, {len(ex['node_ids'])} nodes "
          f"kept, built in {graph_s:.1f} s; max |replacement - real logit| "
          f"{float(ex['max_replacement_logit_diff']):.2g}")
    print(f"peak RSS {rss1 / 1024:.0f} MiB (before the graph {rss0 / 1024:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
