"""`interp-workbench bench`: speed on this machine, as ratios measured in one run.

Patching sweeps are timed against a one-forward-pass-per-cell baseline (the plain way: a hook that replaces one
slice, the whole prompt through the whole model, logits of the last position only) run in the same process;
the baseline is timed on a sample of cells for a few seconds and reported as a rate. Attribution patching is
reported in forward-pass equivalents: its wall time over that of one plain forward pass.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _models(which: str):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from desktop_app.engine.loading import wrap_model

    shapes = {
        "tiny (2 layers, d 64)": dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512),
        "gpt2-small shape (12 layers, d 768)": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257),
    }
    for label, shape in shapes.items():
        if which == "tiny" and "tiny" not in label:
            continue
        torch.manual_seed(0)
        config = GPT2Config(n_positions=256, attn_implementation="eager", bos_token_id=0, eos_token_id=0, **shape)
        yield label, wrap_model(GPT2LMHeadModel(config).float())


def _pair(lm, n_pos: int, differ_at: int):
    import torch

    from desktop_app.engine.model import TokenInfo
    from desktop_app.engine.prompts import PromptPair

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, lm.info.vocab_size, (n_pos,), generator=g).tolist()
    corrupted = list(ids)
    corrupted[differ_at] = (ids[differ_at] + 7) % lm.info.vocab_size

    def info(x):
        return TokenInfo(ids=x, strings=[str(i) for i in x], display=[str(i) for i in x], bos=False)
    return PromptPair(clean=info(ids), corrupted=info(corrupted), answer_id=3, wrong_id=5)


def _baseline_rate(lm, pair, component: str, budget_s: float) -> float:
    """Cells per second of the one-forward-per-cell way, sampled for about budget_s seconds."""
    import torch

    from desktop_app.engine.capture import forward_logits, hooks
    from desktop_app.engine.hooknames import hook_name

    kind = "attn.hook_z" if component == "head_out" else component
    names = [hook_name(L, kind) for L in range(lm.info.n_layers)]
    clean = torch.tensor([pair.clean.ids])
    corrupted = torch.tensor([pair.corrupted.ids])
    with torch.inference_mode():
        t0 = time.perf_counter()
        with hooks(lm, read=names) as store:  # the baseline also needs the clean cache
            forward_logits(lm, clean)
        cells = 0
        while time.perf_counter() - t0 < budget_s or cells < 3:
            layer = cells % lm.info.n_layers
            pos = cells % pair.n_pos
            head = cells % lm.info.n_heads
            name = names[layer]

            def patch(act, name=name, pos=pos, head=head):
                act = act.clone()
                if component == "head_out":
                    act[:, pos, head] = store[name][:, pos, head]
                else:
                    act[:, pos] = store[name][:, pos]
                return act
            with hooks(lm, write={name: patch}):
                forward_logits(lm, corrupted, last_only=True)
            cells += 1
        return cells / (time.perf_counter() - t0)


def _sweep_rate(lm, pair, component: str, min_seconds: float = 1.0) -> tuple[float, int]:
    """Cells per second of the sweep, after one warm-up run, averaged over repeats for at least min_seconds
    (the baseline is averaged the same way)."""
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.patching import activation_patching_job

    def sweep():
        return drive(activation_patching_job(lm, pair, component, "each", "denoise", "logit_diff"))
    cells = sweep().values.size
    runs, t0 = 0, time.perf_counter()
    while runs == 0 or time.perf_counter() - t0 < min_seconds:
        sweep()
        runs += 1
    return cells * runs / (time.perf_counter() - t0), cells


def _forward_time(lm, pair, repeats: int = 5) -> float:
    import torch

    from desktop_app.engine.capture import forward_logits

    ids = torch.tensor([pair.corrupted.ids])
    with torch.inference_mode():
        forward_logits(lm, ids, last_only=True)
        t0 = time.perf_counter()
        for _ in range(repeats):
            forward_logits(lm, ids, last_only=True)
    return (time.perf_counter() - t0) / repeats


def _attribution_equivalents(lm, pair) -> float | None:
    try:
        from desktop_app.engine.attribution import attribution_patching_job
    except ImportError:
        return None
    from desktop_app.engine.jobs import drive

    fwd = _forward_time(lm, pair)
    drive(attribution_patching_job(lm, pair, "resid_pre", "each", "denoise", "logit_diff", "bench"))  # warm up
    t0 = time.perf_counter()
    drive(attribution_patching_job(lm, pair, "head_out", "each", "denoise", "logit_diff", "bench"))
    return (time.perf_counter() - t0) / fwd


def _quantized_models():
    """The GPT-2-small shape in float32, bfloat16, int8 and int4 (bitsandbytes, when installed)."""
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from desktop_app.engine.loading import wrap_model
    from desktop_app.engine.quantize import bitsandbytes_available, quantize_in_memory

    torch.manual_seed(0)
    config = GPT2Config(n_positions=256, attn_implementation="eager", bos_token_id=0, eos_token_id=0,
                        n_layer=12, n_embd=768, n_head=12, vocab_size=50257)
    base = GPT2LMHeadModel(config).float().eval()
    yield "float32", wrap_model(base)
    yield "bfloat16", wrap_model(copy.deepcopy(base).to(torch.bfloat16))
    if not bitsandbytes_available():
        return
    for choice in ("int8", "int4"):
        model = copy.deepcopy(base)
        quantize_in_memory(model, choice, torch.float32)
        lm = wrap_model(model)
        lm.info.quantize = choice
        yield choice, lm


def _quantization_table(n_pos: int, differ_at: int) -> None:
    import numpy as np

    from desktop_app.engine.jobs import drive
    from desktop_app.engine.patching import activation_patching_job

    print("quantisation, gpt2-small shape (12 layers, d 768), resid_pre [layer, pos] sweep; int8 / int4 through "
          "bitsandbytes (the other layers float32)")
    print(f"{'weights':10s} {'memory':>11s} {'cells/s':>9s} {'max |diff| vs float32 (logit diff)':>36s}")
    reference = None
    for label, lm in _quantized_models():
        pair = _pair(lm, n_pos, differ_at)
        rate, _cells = _sweep_rate(lm, pair, "resid_pre")
        values = drive(activation_patching_job(lm, pair, "resid_pre", "each", "denoise", "logit_diff")).values
        reference = values if reference is None else reference
        print(f"{label:10s} {lm.info.memory_bytes / 2**20:7.1f} MiB {rate:9.1f} "
              f"{float(np.abs(values - reference).max()):36.4f}", flush=True)
        del lm


def _sae_rate() -> dict | None:
    try:
        import torch

        from desktop_app.engine.sae.model import SAE, SAEConfig
    except ImportError:
        return None
    d_in, d_sae, n = 768, 16384, 2048
    torch.manual_seed(0)
    cfg = SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae, hook_name="blocks.0.hook_resid_pre")
    sae = SAE(cfg)
    with torch.no_grad():
        for p in (sae.W_enc, sae.W_dec):
            p.normal_(0, 0.02)
    x = torch.randn(n, d_in)
    with torch.inference_mode():
        sae.encode(x)
        t0 = time.perf_counter()
        for _ in range(3):
            sae.encode(x)
        enc = (time.perf_counter() - t0) / 3
        w = torch.randn(d_in, d_sae)
        x @ w
        t0 = time.perf_counter()
        for _ in range(3):
            x @ w
        mm = (time.perf_counter() - t0) / 3
    return {"tokens_per_s": n / enc, "fraction_of_matmul": mm / enc, "gflops_matmul": 2 * n * d_in * d_sae / mm / 1e9}


def _ui_numbers() -> dict | None:
    """The window's event-loop stalls during a streaming sweep and its launch time, in a fresh process."""
    code = ("import json, sys; from desktop_app.ui.stall_probe import measure_ui_stalls; from desktop_app.demo_assets import demo_model_dir; "
            "print('RESULT ' + json.dumps(measure_ui_stalls(str(demo_model_dir()))))")
    env = dict(os.environ)
    if not env.get("DISPLAY"):
        env.setdefault("QT_QPA_PLATFORM", "offscreen")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": (out.stderr.strip().splitlines() or ["no result"])[-1]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="interp-workbench bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", choices=("tiny", "all"), default="all")
    parser.add_argument("--positions", type=int, default=16, help="prompt length in tokens")
    parser.add_argument("--baseline-seconds", type=float, default=4.0)
    parser.add_argument("--differ-at", type=int, default=None,
                        help="the position where the corrupted prompt differs (default: the middle)")
    parser.add_argument("--no-ui", action="store_true", help="skip the window measurements")
    parser.add_argument("--no-analyses", action="store_true",
                        help="skip the lens, attention, logit-attribution and token-attribution timings")
    parser.add_argument("--quantization", choices=("yes", "no", "only"), default="yes",
                        help="memory and cells/s of float32 / bfloat16 / int8 / int4 on the gpt2-small shape")
    parser.add_argument("--no-datasets", action="store_true", help="skip the 32-pair dataset sweeps")
    parser.add_argument("--only-datasets", action="store_true", help="run only the 32-pair dataset sweeps")
    args = parser.parse_args(argv)
    differ_at = args.positions // 2 if args.differ_at is None else min(max(args.differ_at, 0), args.positions - 1)
    import torch

    print(f"interp-workbench bench: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"prompt of {args.positions} tokens")
    if args.only_datasets:
        from desktop_app import bench_datasets

        bench_datasets.run(_models(args.models), args.baseline_seconds)
        return 0
    print(f"(the corrupted prompt differs at position {differ_at}: cells before it patch in an identical "
          "activation and need no forward pass)")
    if args.quantization == "only":
        _quantization_table(args.positions, differ_at)
        return 0
    print(f"{'model':40s} {'sweep':28s} {'cells':>6s} {'cells/s':>9s} {'baseline/s':>10s} {'speed-up':>8s}")
    for label, lm in _models(args.models):
        print(f"{label:40s} load-time conformance check: {lm.conformance.summary()}", flush=True)
        pair = _pair(lm, args.positions, differ_at)
        for component, title in (("resid_pre", "resid_pre [layer, pos]"), ("head_out", "head_out [layer, pos, head]")):
            rate, cells = _sweep_rate(lm, pair, component)
            base = _baseline_rate(lm, pair, component, args.baseline_seconds)
            print(f"{label:40s} {title:28s} {cells:6d} {rate:9.1f} {base:10.1f} {rate / base:7.1f}x", flush=True)
        eq = _attribution_equivalents(lm, pair)
        if eq is not None:
            print(f"{label:40s} attribution patching (all heads): {eq:.1f} forward-pass equivalents", flush=True)
        if not args.no_analyses:
            from desktop_app.bench_lenses import analysis_times

            for title, seconds, ratio in analysis_times(lm, pair, _forward_time(lm, pair)):
                print(f"{label:40s} {title:34s} {seconds:8.3f} s = {ratio:7.1f} forward passes", flush=True)
    if args.quantization == "yes" and args.models == "all":
        _quantization_table(args.positions, differ_at)
    if not args.no_datasets:
        from desktop_app import bench_datasets

        bench_datasets.run(_models(args.models), args.baseline_seconds)
    sae = _sae_rate()
    if sae:
        print(f"SAE encoding (d_in 768, 16384 features): {sae['tokens_per_s']:.0f} tokens/s, "
              f"{sae['fraction_of_matmul']:.2f} of this machine's matmul rate ({sae['gflops_matmul']:.0f} GFLOP/s)")
    if not args.no_ui:
        ui = _ui_numbers()
        if ui and "error" not in ui:
            print(f"window: longest event-loop stall {ui['max_ms']:.1f} ms, p99 {ui['p99_ms']:.1f} ms during a "
                  f"streaming sweep; launch to visible window {ui['launch_to_window_s']:.2f} s")
        else:
            print(f"window: not measured ({(ui or {}).get('error', 'timed out')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
