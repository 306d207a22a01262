"""Build the bundled demo: a tiny GPT-2 trained on indirect-object identification (IOI), an SAE on one of its
hook points, the demo experiment, and a record of what the demo's patching heatmap shows.

    .venv/bin/python packaging/train_demo.py            # writes resources/demo/ and packaging/demo-facts.json

Everything is seeded and uses the project's own code (desktop_app.demo_task for the task and the training
loop, desktop_app.engine for loading, capture, patching and SAE training), so the result is reproducible
on one machine; it takes a minute or two on one CPU thread.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from desktop_app import demo_task  # noqa: E402

SEED = 0
# demo_task.train_ioi_model draws its training prompts from ioi_examples(20000, seed=SEED + 1) and the
# tokenizer is trained on corpus(2000, seed=0); the seeds below are used for nothing else.
EVAL_SEED = 12345
SAE_CORPUS_SEED = 777
MODEL = dict(n_layer=3, n_embd=64, n_head=4, n_positions=64)
TRAIN_STEPS = 400
VOCAB_SIZE = 512
SAE_HOOK = "blocks.1.hook_resid_post"
SAE_CONFIG = dict(architecture="topk", d_sae=128, k=8, steps=1000, batch_size=1024, lr=1e-3, dead_tokens=5000)
SAE_CORPUS_SENTENCES = 4000
# per-layer TopK transcoders (circuit-tracer set format) for the demo's attribution graph; ~400 KB on disk
TRANSCODER_CONFIG = dict(d_transcoder=256, k=16, steps=600, seed=0)
TRANSCODER_CORPUS = dict(sentences=400, seed=3, batch=50)
# corpus.txt: the default corpus of the demo graph's feature cards (top contexts of its transcoder features)
CARDS_CORPUS = dict(sentences=300, seed=11)
MIN_ACCURACY = 0.90

PROMPTS = {
    "clean": "When Mary and John went to the store, John gave a drink to",
    "corrupted": "When Mary and John went to the store, Mary gave a drink to",
    "answer": " Mary",
    "wrong_answer": " John",
}
ANALYSES = [
    {"name": "resid", "kind": "activation_patching", "component": "resid_pre", "positions": "each",
     "direction": "denoise", "metric": "logit_diff_recovered"},
    {"name": "heads", "kind": "activation_patching", "component": "head_out", "positions": "all",
     "direction": "denoise", "metric": "logit_diff_recovered"},
    {"name": "attribution", "kind": "attribution_patching", "component": "resid_pre", "positions": "each",
     "direction": "denoise", "metric": "logit_diff_recovered"},
    {"name": "graph", "kind": "attribution_graph", "transcoders": "transcoders", "prompt": "clean",
     "max_n_logits": 5},
]


def log(msg: str) -> None:
    print(msg, flush=True)


def train_model(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=tok.get_vocab_size(), bos_token_id=0, eos_token_id=0,
                        attn_implementation="eager", **MODEL)
    model = GPT2LMHeadModel(config).float()
    loss = demo_task.train_ioi_model(model, tok, steps=TRAIN_STEPS, seed=SEED)
    return model, loss


def save_model(model, tok, folder: Path) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(folder)  # config.json + model.safetensors (float32; the model is < 1 MB)
    demo_task.save_hf_tokenizer(tok, folder)


def strongest_cells(result, top: int = 5) -> dict:
    """Where the heatmap is bright (largest |value|): per layer the strongest position, and the top cells."""
    import numpy as np

    values = np.asarray(result.values, dtype=float)
    strength = np.nan_to_num(np.abs(values), nan=-1.0)
    positions = result.labels["position"]
    per_layer = []
    for layer in range(values.shape[0]):
        pos = int(np.argmax(strength[layer]))
        per_layer.append({"layer": layer, "position": pos, "token": positions[pos],
                          "value": round(float(values[layer, pos]), 4)})
    order = np.argsort(-strength, axis=None, kind="stable")[:top]
    cells = [{"layer": int(l), "position": int(p), "token": positions[p], "value": round(float(values[l, p]), 4)}
             for l, p in zip(*np.unravel_index(order, values.shape))]
    return {"strongest_position_per_layer": per_layer, "top_cells": cells,
            "values": [[round(float(v), 4) for v in row] for row in values]}


def patching_facts(lm) -> dict:
    import numpy as np

    from desktop_app.engine.attribution import attribution_patching_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.patching import activation_patching_job
    from desktop_app.engine.prompts import prepare_pair

    pair = prepare_pair(lm, PROMPTS["clean"], PROMPTS["corrupted"], PROMPTS["answer"], PROMPTS["wrong_answer"])
    resid = drive(activation_patching_job(lm, pair, "resid_pre", "each", "denoise", "logit_diff_recovered",
                                          name="resid"))
    heads = drive(activation_patching_job(lm, pair, "head_out", "all", "denoise", "logit_diff_recovered",
                                          name="heads"))
    tokens = resid.labels["position"]
    differ = [i for i, (a, b) in enumerate(zip(pair.clean.ids, pair.corrupted.ids)) if a != b]
    if len(differ) != 1:
        raise SystemExit(f"the demo prompts should differ in one token (S2), they differ at {differ}")
    s2 = differ[0]
    attribution = drive(attribution_patching_job(lm, pair, "resid_pre", "each", "denoise",
                                                 "logit_diff_recovered", name="attribution"))
    h = np.asarray(heads.values, dtype=float)
    head_order = np.argsort(-np.nan_to_num(h, nan=-np.inf), axis=None)[:4]
    return {
        "prompt_tokens": tokens,
        "s2_position": s2,
        "final_position": len(tokens) - 1,
        "metric": "logit_diff_recovered (1 = clean behaviour, 0 = corrupted)",
        "resid": strongest_cells(resid),
        "attribution": strongest_cells(attribution),
        "heads": {"values": [[round(float(v), 4) for v in row] for row in h],
                  "top_heads": [{"layer": int(l), "head": int(hd), "value": round(float(h[l, hd]), 4)}
                                for l, hd in zip(*np.unravel_index(head_order, h.shape))]},
    }


def summary(facts: dict) -> list[str]:
    """Plain sentences about the resid heatmap, for the user guide."""
    p, ld = facts["patching"], facts["logit_diff"]
    values, tokens = p["resid"]["values"], p["prompt_tokens"]
    s2, last, n = p["s2_position"], p["final_position"], len(values)
    lines = [f"The clean and corrupted prompts differ only at position {s2} ({tokens[s2]}, the second mention "
             f"of the subject, S2). Logit difference ' Mary' - ' John' at the last position: clean "
             f"{ld['clean']:.2f}, corrupted {ld['corrupted']:.2f}."]
    for layer, row in enumerate(values):
        rest = max(abs(v) for i, v in enumerate(row) if i not in (s2, last))
        lines.append(f"resid_pre layer {layer}: S2 {row[s2]:.2f}, final position ({tokens[last]}) {row[last]:.2f}, "
                     f"every other position at most {rest:.2f}.")
    attr = p["attribution"]["values"]
    pairs = ", ".join(f"layer {i} {row[last]:.2f} vs {values[i][last]:.2f}" for i, row in enumerate(attr))
    lines.append(f"Attribution patching (a linear estimate from one backward pass) shows the same final-position "
                 f"cells, somewhat weaker (attribution vs activation patching: {pairs}), but gets S2 in layer 0 "
                 f"wrong ({attr[0][s2]:.2f} vs {values[0][s2]:.2f}): swapping a whole token embedding is too large "
                 "a change for a first-order estimate.")
    top = p["heads"]["top_heads"][0]
    lines.append(f"The name information sits at S2 at first and attention moves it to the final position: after "
                 f"block 0 the final position already recovers {values[min(1, n - 1)][last]:.2f}, and at layer "
                 f"{n - 1} it recovers {values[-1][last]:.2f} while S2 keeps {values[-1][s2]:.2f}. The strongest "
                 f"single head (heads analysis) is L{top['layer']}H{top['head']} ({top['value']:.2f}).")
    return lines


def logit_diffs(lm) -> dict:
    from desktop_app.engine.capture import run_with_cache

    out = {}
    for which in ("clean", "corrupted"):
        ids = lm.tokenize(PROMPTS[which]).ids
        logits, _ = run_with_cache(lm, [ids], [])
        a, w = lm.single_token_id(PROMPTS["answer"]), lm.single_token_id(PROMPTS["wrong_answer"])
        out[which] = round(float(logits[0, -1, a] - logits[0, -1, w]), 4)
    return out


def collect_activations(lm, hook: str, texts: list[str]) -> torch.Tensor:
    """Activations at `hook` for every token of `texts` (no padding: sentences are grouped by length)."""
    from desktop_app.engine.capture import run_with_cache

    by_length: dict[int, list[list[int]]] = {}
    for text in texts:
        ids = lm.tokenize(text).ids
        by_length.setdefault(len(ids), []).append(ids)
    chunks = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), 256):
            _, acts = run_with_cache(lm, rows[start:start + 256], [hook])
            chunks.append(acts[hook].reshape(-1, acts[hook].shape[-1]).float())
    return torch.cat(chunks)


def train_demo_sae(lm, folder: Path) -> dict:
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.sae.formats import save_saelens
    from desktop_app.engine.sae.metrics import evaluate
    from desktop_app.engine.sae.training import TrainConfig, train_sae

    texts = demo_task.corpus(SAE_CORPUS_SENTENCES, seed=SAE_CORPUS_SEED)
    acts = collect_activations(lm, SAE_HOOK, texts)
    log(f"SAE: {acts.shape[0]} activations of width {acts.shape[1]} at {SAE_HOOK}")
    cfg = TrainConfig(hook_name=SAE_HOOK, seed=SEED, log_every=250, **SAE_CONFIG)
    result = drive(train_sae(acts, cfg), None)
    sae = result.sae
    sae.cfg.metadata = {**(sae.cfg.metadata or {}), "model_name": "interp-workbench-demo-ioi-gpt2",
                        "model_fingerprint": lm.config_hash,  # the model folder is named "model"
                        "prepend_bos": False, "context_size": MODEL["n_positions"],
                        "dataset_path": f"desktop_app.demo_task.corpus({SAE_CORPUS_SENTENCES}, "
                                        f"seed={SAE_CORPUS_SEED})"}
    if folder.exists():
        shutil.rmtree(folder)
    save_saelens(sae, folder)
    metrics = evaluate(sae, acts)
    return {"hook": SAE_HOOK, "tokens": int(acts.shape[0]), **SAE_CONFIG,
            "train_seconds": round(result.elapsed_s, 1),
            **{k: round(float(v), 4) for k, v in metrics.items()}}


def train_demo_transcoders(lm, folder: Path) -> dict:
    """Fit one TopK transcoder per layer (MLP input after its norm -> MLP output) and write the set."""
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.transcoders import fit_transcoders, save_transcoder_set

    c = TRANSCODER_CORPUS
    ids = [lm.tokenize(t, True).ids for t in demo_task.corpus(c["sentences"], seed=c["seed"])]
    n = min(len(i) for i in ids)  # cut to the shortest sentence: batches without padding
    batches = [torch.tensor([i[:n] for i in ids[j:j + c["batch"]]]) for j in range(0, len(ids), c["batch"])]
    t0 = time.perf_counter()
    tset = drive(fit_transcoders(lm, batches, **TRANSCODER_CONFIG))
    if folder.exists():
        shutil.rmtree(folder)
    save_transcoder_set(tset, folder, model_name="interp-workbench-demo-ioi-gpt2")
    return {**TRANSCODER_CONFIG, "corpus": c, "fit_seconds": round(time.perf_counter() - t0, 1),
            "explained_variance": [round(float(v), 4) for v in tset.config["explained_variance"]],
            "bytes": sum(f.stat().st_size for f in folder.iterdir())}


def write_cards_corpus(path: Path) -> dict:
    """One IOI sentence per line: the corpus the demo graph's feature cards are built from."""
    texts = demo_task.corpus(CARDS_CORPUS["sentences"], seed=CARDS_CORPUS["seed"])
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return {**CARDS_CORPUS, "bytes": path.stat().st_size}


def write_experiment(path: Path) -> None:
    experiment = {"version": 1, "model": {"path": "model", "dtype": "float32", "device": "auto"},
                  "prompts": PROMPTS, "analyses": ANALYSES}
    path.write_text(json.dumps(experiment, indent=2) + "\n", encoding="utf-8")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "demo",
                        help="demo folder to write (default: resources/demo)")
    parser.add_argument("--facts", type=Path, default=REPO / "packaging" / "demo-facts.json")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--corpus-only", action="store_true",
                        help="rewrite only the feature cards' corpus (corpus.txt)")
    parser.add_argument("--transcoders-only", action="store_true",
                        help="refit only the transcoders on the existing demo model (and rewrite the experiment)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.corpus_only:
        log(f"cards corpus: {write_cards_corpus(args.out / 'corpus.txt')}")
        return 0
    if args.transcoders_only:
        from desktop_app.engine.loading import load_model

        lm = load_model(args.out / "model", dtype="float32", device="cpu")
        log(f"transcoders: {train_demo_transcoders(lm, args.out / 'transcoders')}")
        write_experiment(args.out / "experiment.json")
        return 0
    started = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    tok = demo_task.train_tokenizer(demo_task.corpus(2000, seed=0), vocab_size=VOCAB_SIZE)
    for key in ("answer", "wrong_answer"):
        if len(tok.encode(PROMPTS[key]).ids) != 1:
            raise SystemExit(f"{PROMPTS[key]!r} is not one token of the demo tokenizer")
    t0 = time.perf_counter()
    model, loss = train_model(tok)
    train_s = time.perf_counter() - t0
    accuracy = demo_task.ioi_accuracy(model, tok, demo_task.ioi_examples(500, seed=EVAL_SEED))
    log(f"model: {TRAIN_STEPS} steps in {train_s:.1f} s, final loss {loss:.4f}, "
        f"held-out IOI accuracy {accuracy:.3f}")
    if accuracy < MIN_ACCURACY:
        raise SystemExit(f"held-out IOI accuracy {accuracy:.3f} is below {MIN_ACCURACY}; not saving")
    save_model(model, tok, out / "model")

    from desktop_app.engine.loading import load_model

    lm = load_model(out / "model", dtype="float32", device="cpu")
    facts = {"model": {**MODEL, "vocab_size": tok.get_vocab_size(), "train_steps": TRAIN_STEPS,
                       "train_seconds": round(train_s, 1), "final_loss": round(loss, 4),
                       "heldout_ioi_accuracy": round(accuracy, 4), "heldout_seed": EVAL_SEED,
                       "heldout_examples": 500, "n_params": lm.info.n_params}}
    facts["logit_diff"] = logit_diffs(lm)
    facts["patching"] = patching_facts(lm)
    facts["summary"] = summary(facts)
    log("\n".join(facts["summary"]))
    t0 = time.perf_counter()
    facts["sae"] = train_demo_sae(lm, out / "sae")
    log(f"SAE: EV {facts['sae']['explained_variance']:.3f}, L0 {facts['sae']['l0']:.1f}, "
        f"dead {facts['sae']['dead_fraction']:.3f} ({time.perf_counter() - t0:.1f} s)")
    facts["transcoders"] = train_demo_transcoders(lm, out / "transcoders")
    log(f"transcoders: {facts['transcoders']}")
    facts["cards_corpus"] = write_cards_corpus(out / "corpus.txt")
    write_experiment(out / "experiment.json")
    facts["build"] = {"total_seconds": round(time.perf_counter() - started, 1), "torch_threads": args.threads,
                      "torch": torch.__version__, "python": platform.python_version(),
                      "machine": platform.machine()}
    args.facts.parent.mkdir(parents=True, exist_ok=True)
    args.facts.write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"wrote {out} and {args.facts} in {facts['build']['total_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
