"""Training per-layer transcoders (the MLP's normalised input -> the MLP's output) on a local corpus, as a job.

    result = drive(train_transcoders(lm, docs, TranscoderTrainConfig(architecture="jumprelu"), cancel))
    save_transcoder_set(result.tset, folder)            # the circuit-tracer set format (engine/transcoders.py)

or, as the `transcoder_training` kind runs it, `transcoder_training_job(lm, corpus, config, out_folder)`.

The corpus is streamed: the model runs over a few documents at a time, every chosen layer's MLP input / output
rows (special tokens and padding left out) fill a buffer of `buffer_tokens` rows, the buffer is shuffled and
served in batches, then refilled from the next documents (the corpus repeats when it runs out). Only the buffer
is in memory, never the corpus' activations.

The optimiser, learning-rate schedule, AuxK loss (TopK), JumpReLU straight-through estimators and the curves
(TrainMetrics) are the SAE trainer's (engine/sae/training.py). JumpReLU (Rajamanoharan et al. 2024):
f = pre * H(pre - theta) with an L0 penalty; theta gets the pseudo-derivatives of a rectangle kernel of width
`jumprelu_bandwidth` and is trained in log space. Inputs and outputs are scaled to E|.| = sqrt(d_model) while
training (factors from the first buffer) and the factors are folded into the returned transcoders. An optional
W_skip (linear skip x -> y) is trained alongside. Cancelling stops after the current step and returns the
transcoders so far (the job writes them as a set that loads).
"""
from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from desktop_app.engine.errors import JobCancelled, SAEError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.sae import corpus as corpus_mod
from desktop_app.engine.sae.metrics import explained_variance
from desktop_app.engine.sae.training import (TrainMetrics, _aux_k_loss, _grad_mode, _JumpReLU, _lr_at, _Step,
                                             optimizer_step)
from desktop_app.engine.transcoders import (Transcoder, TranscoderSet, load_transcoder_set, parse_flat_yaml,
                                            reads_resid_mid, save_transcoder_set)

ARCHITECTURES = ("topk", "jumprelu")
CURVES = ("loss", "l0", "explained_variance", "dead_fraction", "mse", "aux_loss", "lr")


@dataclass
class TranscoderTrainConfig:
    architecture: str = "topk"  # "topk" | "jumprelu"
    d_transcoder: int = 256
    k: int = 16  # topk
    l0_coefficient: float = 1.0  # jumprelu
    l1_warmup_fraction: float = 0.05  # warm-up of the L0 penalty (the SAE trainer's name)
    steps: int = 1000
    batch_size: int = 512
    lr: float = 1e-3
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.2
    aux_k_coefficient: float = 1 / 32
    dead_tokens: int = 20_000
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.05
    skip: bool = False  # train a linear skip W_skip as well
    layers: tuple[int, ...] | None = None  # None: every layer
    buffer_tokens: int = 16_384
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"Transcoder training supports the {', '.join(ARCHITECTURES)} architectures, not "
                           f"{self.architecture!r}.")
        if self.d_transcoder < 1 or self.steps < 1 or self.batch_size < 1 or self.buffer_tokens < 1:
            raise SAEError("width, steps, batch size and buffer size must be positive to train transcoders.")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_transcoder:
            raise SAEError(f"k must be between 1 and the width {self.d_transcoder}, got {self.k}.")
        if self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0:
            raise SAEError("jumprelu_bandwidth and jumprelu_init_threshold must be positive.")
        if self.lr_warmup_steps < 0 or not 0 <= self.lr_decay_fraction <= 1:
            raise SAEError("lr_warmup_steps must be >= 0 and lr_decay_fraction between 0 and 1.")


@dataclass
class LayerTrainMetrics(TrainMetrics):
    """The SAE trainer's curve point, for one layer's transcoder."""
    layer: int = 0


@dataclass
class TranscoderTrainResult:
    tset: TranscoderSet  # the trained layers' transcoders, in the order of `layers`
    layers: list[int]
    history: dict[int, list[LayerTrainMetrics]] = field(default_factory=dict)
    steps_done: int = 0
    cancelled: bool = False
    n_tokens_seen: int = 0
    elapsed_s: float = 0.0


# ---- the corpus as a stream of MLP input / output rows ------------------------------------------------------

class _Enough(Exception):
    """Raised by the last chosen layer's hook to end the forward pass there."""


class MLPRowStream:
    """Shuffled batches of (MLP input, MLP output) rows [batch, d_model] per chosen layer, read from the model a
    buffer at a time over the corpus' documents (cycling)."""

    def __init__(self, lm, docs: list[list[int]], layers: list[int], buffer_tokens: int, gen: torch.Generator,
                 doc_batch: int = 16):
        self.lm, self.docs, self.layers, self.gen = lm, docs, layers, gen
        self.buffer_tokens, self.doc_batch = buffer_tokens, doc_batch
        self.skip_ids = sorted(corpus_mod.special_ids(lm))
        self.next_doc, self.epoch, self.tokens_read = 0, 0, 0
        self.x: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.order, self.cursor = torch.zeros(0, dtype=torch.long), 0

    def fill(self, cancel: CancelToken) -> bool:
        """Refill the buffer; False when cancelled meanwhile (the caller stops)."""
        ins: list[list[torch.Tensor]] = [[] for _ in self.layers]
        outs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        caught: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []

        last = max(range(len(self.layers)), key=lambda slot: self.layers[slot])

        def grab(slot):
            def hook(_mod, args, output):
                out = output[0] if isinstance(output, (tuple, list)) else output
                caught[slot] = (args[0].detach().float(), out.detach().float())
                if slot == last:
                    raise _Enough()  # the layers after the last chosen one are not needed
            return hook

        n, empty_epochs = 0, 0
        try:
            for slot, layer in enumerate(self.layers):
                handles.append(self.lm.adapter.mlp(layer).register_forward_hook(grab(slot)))
            with torch.no_grad():
                while n < self.buffer_tokens:
                    if cancel.cancelled:
                        return False
                    if self.next_doc >= len(self.docs):
                        self.next_doc, self.epoch = 0, self.epoch + 1
                        empty_epochs = empty_epochs + 1 if n == 0 else 0
                        if empty_epochs > 1:
                            raise SAEError("The corpus gives no tokens besides special ones; add more text.")
                    chunk = self.docs[self.next_doc:self.next_doc + self.doc_batch]
                    self.next_doc += len(chunk)
                    (_, ids, lengths), = corpus_mod.padded_batches(chunk, len(chunk))
                    keep = torch.arange(ids.shape[1])[None, :] < lengths[:, None]
                    if self.skip_ids:
                        keep &= ~torch.isin(ids, torch.tensor(self.skip_ids))
                    try:
                        self.lm.model(input_ids=ids.to(self.lm.input_device))
                    except _Enough:
                        pass
                    for slot in range(len(self.layers)):
                        x, y = caught[slot]
                        ins[slot].append(x.cpu()[keep])
                        outs[slot].append(y.cpu()[keep])
                    n += int(keep.sum())
        finally:
            for h in handles:
                h.remove()
        self.tokens_read += n
        self.x = [torch.cat(v) for v in ins]
        self.y = [torch.cat(v) for v in outs]
        self.order, self.cursor = torch.randperm(n, generator=self.gen), 0
        return True

    def batch(self, size: int, cancel: CancelToken) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        if self.cursor + size > len(self.order) and not self.fill(cancel):
            return None
        size = min(size, len(self.order))
        idx = self.order[self.cursor:self.cursor + size]
        self.cursor += size
        return [(x[idx], y[idx]) for x, y in zip(self.x, self.y)]


# ---- one layer's transcoder in training -------------------------------------------------------------------

class _LayerFit:
    """Parameters (in the scaled space), optimiser and dead-feature counters of one layer's transcoder."""

    def __init__(self, cfg: TranscoderTrainConfig, layer: int, x: torch.Tensor, y: torch.Tensor, gen):
        self.cfg, self.layer = cfg, layer
        d = x.shape[1]
        self.sx = math.sqrt(d) / max(float(x.norm(dim=-1).mean()), 1e-12)
        self.sy = math.sqrt(d) / max(float(y.norm(dim=-1).mean()), 1e-12)
        w_dec = torch.randn(cfg.d_transcoder, d, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        self.params = {"W_enc": w_dec.clone(), "W_dec": w_dec, "b_enc": torch.zeros(cfg.d_transcoder),
                       "b_dec": (y.mean(0) * self.sy).clone()}
        if cfg.skip:
            self.params["W_skip"] = torch.zeros(d, d)
        if cfg.architecture == "jumprelu":
            self.params["log_threshold"] = torch.full((cfg.d_transcoder,), math.log(cfg.jumprelu_init_threshold))
        self.params = {k: torch.nn.Parameter(v) for k, v in self.params.items()}
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(cfg.d_transcoder, dtype=torch.long)
        self.history: list[LayerTrainMetrics] = []

    def loss(self, x: torch.Tensor, y: torch.Tensor, step: int):
        """(loss, mse, AuxK or L0 term, feature activations, reconstruction) of a scaled batch."""
        cfg, p = self.cfg, self.params
        pre = x @ p["W_enc"].T + p["b_enc"]
        if cfg.architecture == "jumprelu":
            theta = p["log_threshold"].exp()
            f = _JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)
        else:
            values, indices = torch.relu(pre).topk(cfg.k, dim=-1)
            f = torch.zeros_like(pre).scatter(-1, indices, values)
        y_hat = f @ p["W_dec"] + p["b_dec"]
        if "W_skip" in p:
            y_hat = y_hat + x @ p["W_skip"].T
        mse = (y_hat - y).pow(2).sum(dim=-1).mean()
        if cfg.architecture == "jumprelu":
            warm = min(1.0, (step + 1) / max(1, cfg.steps * cfg.l1_warmup_fraction))
            aux = _Step.apply(pre, theta, cfg.jumprelu_bandwidth).sum(dim=-1).mean()
            loss = mse + cfg.l0_coefficient * warm * aux
        else:
            dead = self.since_fired >= cfg.dead_tokens
            aux = _aux_k_loss(SimpleNamespace(W_dec=p["W_dec"]), y, y_hat, pre, dead)
            loss = mse + cfg.aux_k_coefficient * aux
        return loss, mse, aux, f, y_hat

    def step(self, x_raw: torch.Tensor, y_raw: torch.Tensor, step: int, lr: float,
             measure: bool) -> LayerTrainMetrics | None:
        x, y = x_raw * self.sx, y_raw * self.sy
        for group in self.opt.param_groups:
            group["lr"] = lr
        loss, mse, aux, f, y_hat = self.loss(x, y, step)
        optimizer_step(self.opt, list(self.params.values()), loss, step)
        with torch.no_grad():
            W_dec = self.params["W_dec"]
            W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            fired = (f != 0).any(dim=0)
            self.since_fired += x.shape[0]
            self.since_fired[fired] = 0
            if not measure:
                return None
            return LayerTrainMetrics(
                step=step + 1, loss=float(loss), l0=float((f != 0).sum(dim=-1).float().mean()),
                explained_variance=explained_variance(y, y_hat.detach()),
                dead_fraction=float((self.since_fired >= self.cfg.dead_tokens).float().mean()),
                mse=float(mse), aux_loss=float(aux), lr=lr, layer=self.layer)

    @torch.no_grad()
    def transcoder(self) -> Transcoder:
        """The transcoder on raw activations: the training scales folded into the weights (exactly)."""
        p, sx, sy = self.params, self.sx, self.sy
        threshold = p["log_threshold"].detach().exp().clone() if "log_threshold" in p else None
        skip = (p["W_skip"].detach() * (sx / sy)).clone() if "W_skip" in p else None
        return Transcoder(W_enc=(p["W_enc"].detach() * sx).clone(), W_dec=(p["W_dec"].detach() / sy).clone(),
                          b_enc=p["b_enc"].detach().clone(), b_dec=(p["b_dec"].detach() / sy).clone(),
                          activation=self.cfg.architecture, threshold=threshold,
                          k=self.cfg.k if self.cfg.architecture == "topk" else None, W_skip=skip)


# ---- the jobs ---------------------------------------------------------------------------------------------

def _chosen_layers(lm, layers) -> list[int]:
    n = len(lm.adapter.blocks)
    chosen = list(range(n)) if not layers else sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < n]
    if bad:
        raise SAEError(f"layer(s) {bad} do not exist; the model has layers 0 to {n - 1}.")
    return chosen


def train_transcoders(lm, docs: list[list[int]], cfg: TranscoderTrainConfig, cancel: CancelToken | None = None):
    """Job: a transcoder per chosen layer, all trained on the same streamed batches; yields Progress and one
    LayerTrainMetrics per layer every log_every steps; returns TranscoderTrainResult (cancelled: the
    transcoders so far; cancelled before the first step: JobCancelled)."""
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    layers = _chosen_layers(lm, cfg.layers)
    if not docs:
        raise SAEError("The corpus gives no tokens; add more text.")
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = MLPRowStream(lm, docs, layers, max(cfg.buffer_tokens, cfg.batch_size), gen)
    yield Progress(0, cfg.steps, "reading the MLPs over the corpus")
    with _grad_mode():
        if not stream.fill(cancel):
            raise JobCancelled()
        if len(stream.order) < 2:
            raise SAEError(f"The corpus gives {len(stream.order)} token(s) besides special ones; add more text.")
        fits = [_LayerFit(cfg, layer, stream.x[i], stream.y[i], gen) for i, layer in enumerate(layers)]
    result = TranscoderTrainResult(tset=TranscoderSet([], {}), layers=layers)
    step = 0
    while step < cfg.steps:
        if cancel.cancelled:
            result.cancelled = True
            break
        with _grad_mode():
            rows = stream.batch(cfg.batch_size, cancel)
            if rows is None:
                result.cancelled = True
                break
            lr = _lr_at(step, cfg)
            measure = step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
            metrics = [fit.step(x, y, step, lr, measure) for fit, (x, y) in zip(fits, rows)]
        step += 1
        result.steps_done = step
        if measure:
            for fit, m in zip(fits, metrics):
                fit.history.append(m)
                yield m
            worst = min(m.explained_variance for m in metrics)
            yield Progress(step, cfg.steps, f"step {step}/{cfg.steps}  lowest explained variance {worst:.3f}")
    if result.cancelled and step == 0:
        raise JobCancelled()  # nothing trained: no set of initial weights is written
    result.tset = TranscoderSet([fit.transcoder() for fit in fits],
                                {"activation": cfg.architecture, "k": cfg.k if cfg.architecture == "topk" else None})
    result.history = {fit.layer: fit.history for fit in fits}
    result.n_tokens_seen = stream.tokens_read
    result.elapsed_s = time.perf_counter() - started
    return result


def _is_set(folder: Path) -> bool:
    cfg = folder / "config.yaml"
    if not cfg.is_file() or cfg.stat().st_size > 1_000_000:
        return False
    try:
        return parse_flat_yaml(cfg.read_text(encoding="utf-8", errors="replace"), str(cfg)).get(
            "model_kind", "transcoder_set") == "transcoder_set"
    except SAEError:
        return False


def write_set(tset: TranscoderSet, folder, model_name: str, info: dict) -> Path:
    """Write a circuit-tracer set to `folder` by way of a sibling temporary folder (a crash leaves the old set),
    with training.json beside it; a folder that holds something else than a transcoder set is refused."""
    import json

    folder = Path(folder).expanduser()
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not _is_set(folder))):
        raise SAEError(f"{folder} exists and is not a transcoder set; choose a new or empty output folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    save_transcoder_set(tset, tmp, model_name=model_name)
    (tmp / "training.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    old = folder.parent / f".{folder.name}.old-{os.getpid()}"
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)
    return folder


def corpus_documents(lm, corpus_path, context: int, max_tokens: int,
                     prepend_bos: bool | None = True) -> list[list[int]]:
    """The corpus' token ids cut into pieces of at most `context`, starting as the prompts of an analysis start
    (LoadedModel.tokenize): prepend_bos True puts the tokenizer's BOS before every piece, False none, None
    what the tokenizer adds. A BOS is read as context but never trained on (a special token)."""
    texts = corpus_mod.read_corpus(corpus_path)
    bos = getattr(lm.tokenizer, "bos_token_id", None)
    if prepend_bos is None or bos is None:
        return corpus_mod.tokenize_documents(lm, texts, context, max_tokens)
    context = max(3, min(int(context), int(lm.info.n_ctx)))
    docs = corpus_mod.tokenize_documents(lm, texts, context - 1, max_tokens)
    docs = [d[1:] if d[0] == bos else d for d in docs]
    return [[int(bos)] + d if prepend_bos else d for d in docs if d]


def _existing_set(lm, folder, cfg: TranscoderTrainConfig) -> TranscoderSet:
    """The set at `folder` whose chosen layers a run of some layers replaces; refused in one sentence when there
    is none for this model, or it has another activation / k (a set has one for all its layers)."""
    n = len(lm.adapter.blocks)
    if not (Path(folder).expanduser() / "config.yaml").is_file():
        raise SAEError(f"training only layers {list(cfg.layers)} replaces them in an existing set, but {folder} holds "
                       "none; train every layer first (leave 'layers' empty).")
    old = load_transcoder_set(Path(folder).expanduser(), n_layers=n, d_model=lm.info.d_model)
    if getattr(old, "cross_layer", False) or reads_resid_mid(old):
        raise SAEError(f"the set in {folder} is a cross-layer set or reads hook_resid_mid, but training writes "
                       "per-layer transcoders that read the MLP's input; choose a new folder.")
    first = old.layers[0]
    k = cfg.k if cfg.architecture == "topk" else None
    if first.activation != cfg.architecture or (k is not None and first.k != k):
        raise SAEError(f"the set in {folder} is {first.activation}" + (f" with k={first.k}" if first.k else "")
                       + f", but this run trains {cfg.architecture}" + (f" with k={k}" if k else "")
                       + "; a set has one activation for all layers, so choose the same or a new folder.")
    return old


def transcoder_training_job(lm, corpus_path, config: TranscoderTrainConfig | dict | None = None, out_folder=None,
                            cancel: CancelToken | None = None, context: int = 128, max_tokens: int = 200_000,
                            name: str = "transcoder_training", prepend_bos: bool | None = None):
    """The `transcoder_training` analysis: trains on a local corpus and writes a circuit-tracer set of every layer
    to out_folder (also when cancelled: the transcoders so far, a set that loads). With `layers`, only those are
    trained and replaced in the set already at out_folder. values [layer, step] (the loss of each trained layer);
    every curve [layer, step] in extras."""
    from desktop_app.engine.results import AnalysisResult

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if out_folder is None or not str(out_folder).strip():
        raise SAEError("Transcoder training needs an output folder; choose where to write the set.")
    cfg = config if isinstance(config, TranscoderTrainConfig) else TranscoderTrainConfig(**(config or {}))
    layers = _chosen_layers(lm, cfg.layers)
    n_layers = len(lm.adapter.blocks)
    base = _existing_set(lm, out_folder, cfg) if len(layers) < n_layers else None
    docs = corpus_documents(lm, corpus_path, context, max_tokens, prepend_bos)
    trained = yield from train_transcoders(lm, docs, cfg, cancel)
    full = list(base.layers) if base is not None else [None] * n_layers
    for L, tc in zip(layers, trained.tset.layers):
        full[L] = tc
    model_name = os.path.basename(str(lm.path))
    steps = [m.step for m in trained.history[layers[0]]]
    curves = {c: np.array([[getattr(m, c) for m in trained.history[L]] for L in layers], dtype=np.float32)
              for c in CURVES}
    info = {"model_name": model_name, "model_fingerprint": lm.config_hash or "", "corpus": str(corpus_path),
            "layers_trained": layers, "steps_done": trained.steps_done, "cancelled": trained.cancelled,
            "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "final_explained_variance": {str(L): float(curves["explained_variance"][i, -1])
                                         for i, L in enumerate(layers)}}
    folder = write_set(TranscoderSet(full, dict(trained.tset.config)), out_folder, model_name, info)
    where = f"the transcoders so far are saved in {folder}"
    return AnalysisResult(
        name=name, kind="transcoder_training",
        params=dict(corpus=str(corpus_path), out_folder=str(folder), layers=layers,
                    steps_done=int(trained.steps_done), n_tokens_seen=int(trained.n_tokens_seen),
                    config=info["config"], checkpoint=str(folder) if trained.cancelled else ""),
        dims=["layer", "step"], values=curves["loss"].copy(),
        labels={"layer": [str(L) for L in layers], "step": [str(s) for s in steps]},
        status="partial" if trained.cancelled else "complete",
        message=f"cancelled after {trained.steps_done} of {cfg.steps} steps; {where}" if trained.cancelled else "",
        elapsed_s=time.perf_counter() - t0, extras={**curves, "out_folder": np.array(str(folder))})
