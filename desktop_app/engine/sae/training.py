"""Training an SAE on a tensor of activations [n, d_in], as a job (see engine/jobs.py).

    job = train_sae(acts, TrainConfig(architecture="topk", d_sae=512, k=16, steps=3000), cancel)
    result = drive(job, on_event)        # events: Progress and TrainMetrics
    save_saelens(result.sae, folder)

TopK (OpenAI, "Scaling and evaluating sparse autoencoders"): unit-norm decoder rows, AuxK loss that asks
the top k_aux dead latents to reconstruct the residual. ReLU + L1 (Anthropic April 2024 update): L1 on
f_i * |W_dec,i| with a warm-up, plus resampling of dead features towards badly reconstructed inputs.
Inputs are scaled so that E|x| = sqrt(d_in) while training; the factor is folded into the returned SAE,
which works on the raw activations. Cancelling stops after the current step and returns the SAE so far.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.sae.metrics import explained_variance
from desktop_app.engine.sae.model import SAE, SAEConfig


@dataclass
class TrainConfig:
    architecture: str = "topk"  # "topk" | "standard" (ReLU + L1)
    d_sae: int = 256
    k: int = 16
    l1_coefficient: float = 5.0
    l1_warmup_fraction: float = 0.05
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    aux_k_coefficient: float = 1 / 32
    dead_tokens: int = 20_000  # a feature that has not fired for this many tokens is dead
    resample_every: int = 500  # standard only; 0 disables resampling
    hook_name: str | None = None
    seed: int = 0
    log_every: int = 50

    def __post_init__(self):
        if self.architecture not in ("topk", "standard"):
            raise SAEError(f"Training supports the topk and standard architectures, not {self.architecture!r}.")
        if self.d_sae < 1 or self.steps < 1 or self.batch_size < 1:
            raise SAEError("d_sae, steps and batch_size must be positive to train an SAE.")
        if self.architecture == "topk" and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}.")


@dataclass
class TrainMetrics:
    step: int
    loss: float
    l0: float
    explained_variance: float
    dead_fraction: float
    mse: float = 0.0
    aux_loss: float = 0.0


@dataclass
class TrainResult:
    sae: SAE
    history: list[TrainMetrics] = field(default_factory=list)
    steps_done: int = 0
    cancelled: bool = False
    elapsed_s: float = 0.0
    scaling_factor: float = 1.0


def _init_sae(cfg: TrainConfig, d_in: int, x: torch.Tensor, gen: torch.Generator) -> SAE:
    arch = cfg.architecture
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=cfg.d_sae, hook_name=cfg.hook_name,
                        k=cfg.k if arch == "topk" else None, apply_b_dec_to_input=True))
    with torch.no_grad():
        w_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        if arch == "standard":
            w_dec *= 0.1
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.copy_(x.mean(dim=0))
    return sae


def _lr_at(step: int, cfg: TrainConfig) -> float:
    decay_start = int(cfg.steps * (1 - cfg.lr_decay_fraction))
    if step < decay_start:
        return cfg.lr
    return cfg.lr * max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))


def _aux_k_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor):
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    k_aux = min(x.shape[-1] // 2, n_dead)
    scale = min(n_dead / max(1, x.shape[-1] // 2), 1.0)
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    aux_acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    residual = (x - x_hat).detach()
    return scale * (aux_acts @ sae.W_dec - residual).pow(2).sum(dim=-1).mean()


@torch.no_grad()
def _resample_dead(sae: SAE, opt: torch.optim.Adam, x: torch.Tensor, dead: torch.Tensor, gen: torch.Generator):
    """Point dead features at inputs the SAE reconstructs badly (probability ~ squared error)."""
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return
    x_hat, _ = sae(x)
    err = (x - x_hat).pow(2).sum(dim=-1)
    picks = torch.multinomial(err.clamp_min(1e-12), idx.numel(), replacement=True, generator=gen)
    directions = x[picks] - sae.b_dec
    directions /= directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
    sae.W_dec[idx] = directions * 0.1
    sae.W_enc[:, idx] = directions.T * enc_norm * 0.2
    sae.b_enc[idx] = 0.0
    for param in (sae.W_enc, sae.W_dec, sae.b_enc):
        state = opt.state.get(param)
        if not state:
            continue
        for key in ("exp_avg", "exp_avg_sq"):
            if param is sae.W_enc:
                state[key][:, idx] = 0.0
            else:
                state[key][idx] = 0.0


@torch.no_grad()
def _flush_tiny_optimizer_state(opt: torch.optim.Adam) -> None:
    """Adam moments of features that stop receiving gradient decay geometrically into subnormal floats,
    which are ~50x slower on CPUs; zeroing them early keeps every step at full speed."""
    for state in opt.state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key].masked_fill_(state[key].abs() < 1e-30, 0.0)


def train_sae(acts: torch.Tensor, cfg: TrainConfig, cancel: CancelToken | None = None):
    """Job: trains an SAE on activations [n, d_in]; yields Progress and TrainMetrics; returns TrainResult."""
    if acts.dim() != 2 or acts.shape[0] < 2:
        raise SAEError(f"Training needs activations shaped [tokens, d_in] with at least 2 tokens, got "
                       f"{tuple(acts.shape)}.")
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(cfg.seed)
    x_all = acts.detach().float().cpu()
    n, d_in = x_all.shape
    scale = math.sqrt(d_in) / float(x_all.norm(dim=-1).mean().clamp_min(1e-12))
    x_all = x_all * scale

    sae = _init_sae(cfg, d_in, x_all, gen).requires_grad_(True)
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
    batch = min(cfg.batch_size, n)
    since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)  # tokens since each feature last fired
    order, cursor = torch.randperm(n, generator=gen), 0
    result = TrainResult(sae=sae, scaling_factor=scale)
    yield Progress(0, cfg.steps, "training SAE")

    for step in range(cfg.steps):
        if cancel.cancelled:
            result.cancelled = True
            break
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=gen), 0
        x = x_all[order[cursor:cursor + batch]]
        cursor += batch
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)

        f, pre = sae.encode_with_hidden_pre(x)
        x_hat = f @ sae.W_dec + sae.b_dec
        mse = (x_hat - x).pow(2).sum(dim=-1).mean()
        dead = since_fired >= cfg.dead_tokens
        if cfg.architecture == "topk":
            aux = _aux_k_loss(sae, x, x_hat, pre, dead)
            loss = mse + cfg.aux_k_coefficient * aux
        else:
            warm = min(1.0, (step + 1) / max(1, cfg.steps * cfg.l1_warmup_fraction))
            aux = (f * sae.W_dec.norm(dim=-1)).sum(dim=-1).mean()
            loss = mse + cfg.l1_coefficient * warm * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        if step % 32 == 31:
            _flush_tiny_optimizer_state(opt)
        with torch.no_grad():
            if cfg.architecture == "topk":
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            fired = (f != 0).any(dim=0)
            since_fired += batch
            since_fired[fired] = 0

        if cfg.architecture == "standard" and cfg.resample_every and (step + 1) % cfg.resample_every == 0 \
                and step + 1 < cfg.steps * 0.8:
            dead_now = since_fired >= min(cfg.dead_tokens, cfg.resample_every * batch)
            _resample_dead(sae, opt, x_all[torch.randint(0, n, (min(n, 8192),), generator=gen)], dead_now, gen)
            since_fired[dead_now] = 0

        result.steps_done = step + 1
        if step == 0 or (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            with torch.no_grad():
                metrics = TrainMetrics(
                    step=step + 1, loss=float(loss), l0=float((f != 0).sum(dim=-1).float().mean()),
                    explained_variance=explained_variance(x, x_hat),
                    dead_fraction=float((since_fired >= cfg.dead_tokens).float().mean()),
                    mse=float(mse), aux_loss=float(aux))
            result.history.append(metrics)
            yield metrics
            yield Progress(step + 1, cfg.steps, f"step {step + 1}/{cfg.steps}  loss {metrics.loss:.4g}  "
                                                f"L0 {metrics.l0:.1f}  EV {metrics.explained_variance:.3f}")

    # Leave the SAE working on raw activations: record the training scale, then fold it into the weights.
    sae.cfg.normalize_activations = "expected_average_only_in"
    sae.cfg.norm_scaling_factor = scale
    sae.fold_scaling_factor()
    sae.requires_grad_(False)
    sae.eval()
    result.elapsed_s = time.perf_counter() - started
    return result
