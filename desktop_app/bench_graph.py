"""Time and peak memory of an attribution graph, per phase (record, edges, pruning): fits TopK transcoders on the
model's own MLPs (demo-task corpus), then builds and prunes the graph of one prompt.

    PYTHONPATH=$PWD python -m desktop_app.bench_graph resources/demo/model [--out FOLDER]
    PYTHONPATH=$PWD python -m desktop_app.bench_graph resources/demo/model --gpt2-small-shape [--width 6144]
        [--eager-decoders] [--max-feature-nodes 7500]

The second builds a randomly initialised model of GPT-2 small's shape (12 layers, d_model 768, vocabulary 50257)
with the demo tokenizer and random TopK transcoders (k 32; not fitted: the error nodes carry what they miss), writes
them as a circuit-tracer set and reads it back with lazy decoders, for the time and memory of a graph of that shape
only. Peak memory is the resident set's high-water mark (VmHWM), reset at the start of each phase on Linux. Each
phase also gives its CPU time (all threads of the process), which a machine shared with other work inflates less
than the wall time.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

_CLEAR_REFS = "/proc/self/clear_refs"


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> bool:
    """Reset the high-water mark to the current resident set (Linux); False where that is not possible."""
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _mib(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MiB"


class PhaseMeter:
    """Drives a graph job; the phase changes at each Progress whose `done` moves (0 record, 1 edges, 2 pruning)."""
    NAMES = ("record", "edges", "pruning")

    def __init__(self, verbose: bool = False):
        self.verbose = verbose
        self.rows: list[tuple[str, float, float, int]] = []
        self.phase, self.t_phase, self.cpu_phase = None, None, None
        self.resettable = _reset_peak()
        self.t0 = time.perf_counter()

    def _close(self):
        if self.phase is not None:
            self.rows.append((self.NAMES[self.phase], time.perf_counter() - self.t_phase,
                              time.process_time() - self.cpu_phase, _peak_bytes()))

    def __call__(self, event):
        done = getattr(event, "done", None)
        if done is not None and done != self.phase and done < len(self.NAMES):
            self._close()
            _reset_peak()
            self.phase, self.t_phase, self.cpu_phase = done, time.perf_counter(), time.process_time()
        if self.verbose and getattr(event, "message", ""):
            print(f"{time.perf_counter() - self.t0:7.1f} s  {event.message}", flush=True)

    def report(self) -> str:
        self._close()
        self.phase = None
        what = "peak RSS" if self.resettable else "peak RSS since start"
        return "; ".join(f"{name} {s:.2f} s (CPU {cpu:.2f} s), {what} {_mib(peak)}" for name, s, cpu, peak in self.rows)


def _load_line() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "load average unknown"


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
    p.add_argument("--width", type=int, default=None, help="transcoder width (512 fitted; 6144 GPT-2-small shape)")
    p.add_argument("--k", type=int, default=None)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--out", default=None, help="also write the transcoder set here")
    p.add_argument("--max-feature-nodes", type=int, default=7500)
    p.add_argument("--gpt2-small-shape", action="store_true")
    p.add_argument("--eager-decoders", action="store_true", help="GPT-2-small shape: read whole decoders at load")
    args = p.parse_args(argv)
    if args.gpt2_small_shape:
        return _gpt2_small_shape(args)
    width, k = args.width or 512, args.k or 16
    lm = load_model(args.model, dtype="float32", device="cpu")
    texts = demo_task.corpus(400, seed=3)
    ids = [lm.tokenize(t, True).ids for t in texts]
    n = min(len(i) for i in ids)
    batches = [torch.tensor([i[:n] for i in ids[j:j + 50]]) for j in range(0, len(ids), 50)]
    t0 = time.perf_counter()
    tset = drive(fit_transcoders(lm, batches, d_transcoder=width, k=k, steps=args.steps))
    fit_s = time.perf_counter() - t0
    if args.out:
        save_transcoder_set(tset, args.out, model_name="interp-workbench-demo")
    before = _peak_bytes()
    meter = PhaseMeter()
    t0 = time.perf_counter()
    result = drive(attribution_graph_job(lm, lm.tokenize(args.prompt, True), "", tset=tset,
                                         max_feature_nodes=args.max_feature_nodes), meter)
    graph_s = time.perf_counter() - t0
    ex = result.extras
    print(f"model: {lm.info.summary()}")
    print(f"transcoders: width {width}, k {k}, {args.steps} steps, fitted in {fit_s:.1f} s; explained "
          f"variance per layer {[round(v, 3) for v in tset.config['explained_variance']]}")
    print(f"graph: {len(lm.tokenize(args.prompt, True).ids)} tokens, {len(ex['node_ids'])} nodes kept, "
          f"{int((ex['adjacency'] != 0).sum())} edges kept, built in {graph_s:.2f} s")
    print(f"phases: {meter.report()}")
    print(f"replacement score {float(ex['replacement_score']):.3f}, completeness {float(ex['completeness_score']):.3f},"
          f" max |replacement - real logit| {float(ex['max_replacement_logit_diff']):.2g}")
    print(f"peak RSS before the graph {_mib(before)}; torch threads {torch.get_num_threads()}; {_load_line()}")
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
    from desktop_app.engine.transcoders import Transcoder, TranscoderSet, load_transcoder_set, save_transcoder_set

    torch.manual_seed(0)
    width, k, d, n_layers = args.width or 6144, args.k or 32, 768, 12
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "gpt2-small-shape"
        cfg = GPT2Config(n_layer=n_layers, n_embd=d, n_head=12, vocab_size=50257, n_positions=1024,
                         attn_implementation="eager")
        GPT2LMHeadModel(cfg).eval().save_pretrained(folder)
        for f in Path(args.model).glob("*token*"):
            shutil.copy(f, folder / f.name)
        lm = load_model(str(folder), dtype="float32", device="cpu")
        gen = torch.Generator().manual_seed(0)
        for L in range(n_layers):  # one layer at a time, so the whole set is never in memory here
            layer = Transcoder(torch.randn(width, d, generator=gen) / d ** 0.5,
                               torch.randn(width, d, generator=gen) * 0.02, torch.zeros(width), torch.zeros(d), "topk",
                               None, k)
            save_transcoder_set(TranscoderSet([layer], {}), Path(tmp) / f"part{L}")
            (Path(tmp) / f"part{L}" / "layer_0.safetensors").rename(Path(tmp) / f"layer_{L}.safetensors")
        (Path(tmp) / "config.yaml").write_text("model_kind: transcoder_set\nactivation: topk\n"
                                               f"k: {k}\n", encoding="utf-8")
        tset = load_transcoder_set(tmp, n_layers=n_layers, d_model=d, lazy_decoders=not args.eager_decoders)
        decoder_bytes = sum(tc.decoder_shape.numel() * 4 for tc in tset.layers)
        tokens = lm.tokenize(args.prompt, True)
        before = _peak_bytes()
        meter = PhaseMeter(verbose=True)
        t0 = time.perf_counter()
        result = drive(attribution_graph_job(lm, tokens, "", tset=tset, max_feature_nodes=args.max_feature_nodes),
                       meter)
        graph_s = time.perf_counter() - t0
        loaded = sum(tc.decoder_loaded for tc in tset.layers)
    ex = result.extras
    print(f"model: {lm.info.summary()} (random weights)")
    print(f"transcoders: width {width}, k {k}; decoders {_mib(decoder_bytes)} on disk, {loaded} of {n_layers} "
          f"loaded whole; encoders in memory {_mib(decoder_bytes)}")
    print(f"graph: {len(tokens.ids)} tokens, {n_layers * len(tokens.ids) * k} active features, max_feature_nodes "
          f"{args.max_feature_nodes}, {len(ex['node_ids'])} nodes kept, built in {graph_s:.1f} s; max |replacement - "
          f"real logit| {float(ex['max_replacement_logit_diff']):.2g}")
    print(f"phases: {meter.report()}")
    print(f"peak RSS before the graph {_mib(before)} (model, encoders, set writing); torch threads "
          f"{torch.get_num_threads()}; {_load_line()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
