"""Training an SAE on activations [n, d_in] (a tensor, or cached rows read from disk), as a job.

    job = train_sae(acts, TrainConfig(architecture="topk", d_sae=512, k=16, steps=3000), cancel,
                    checkpoint_dir=folder / "checkpoints", resume_from=None)
    result = drive(job, on_event)        # events: Progress and TrainMetrics
    save_saelens(result.sae, folder)

TopK (OpenAI, "Scaling and evaluating sparse autoencoders"): unit-norm decoder rows, AuxK loss that asks
the top k_aux dead latents to reconstruct the residual. BatchTopK (Bussmann et al. 2024): the k * batch
largest activations of the whole batch are kept, so L0 varies per token with mean k; at inference it becomes
a JumpReLU with one threshold, the running mean of the smallest kept activation (as SAELens does). JumpReLU
(Rajamanoharan et al. 2024): f = pre * H(pre - theta), trained with an L0 penalty; H has no gradient, so
theta gets the straight-through pseudo-derivatives of the paper (a rectangle kernel of width `bandwidth`).
ReLU + L1 (Anthropic April 2024 update): L1 on f_i * |W_dec,i| with a warm-up, plus resampling of dead
features towards badly reconstructed inputs.

Learning rate: linear warm-up over lr_warmup_steps, constant, linear decay to 0 over the last
lr_decay_fraction of the steps. Inputs are scaled so that E|x| = sqrt(d_in) while training; the factor is
folded into the returned SAE, which works on the raw activations. Cancelling stops after the current step
and returns the SAE so far. With checkpoint_dir, the full training state is saved every checkpoint_every
steps and on cancel; resume_from continues a run bit for bit (same seed and settings).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from desktop_app.engine.errors import SAEError
from desktop_app.engine.jobs import CancelToken, Progress
from desktop_app.engine.sae.checkpoints import load_checkpoint, save_checkpoint
from desktop_app.engine.sae.metrics import explained_variance
from desktop_app.engine.sae.model import SAE, SAEConfig

TRAIN_ARCHITECTURES = ("topk", "batchtopk", "standard", "jumprelu")


@dataclass
class TrainConfig:
    architecture: str = "topk"  # "topk" | "batchtopk" | "standard" (ReLU + L1) | "jumprelu"
    d_sae: int = 256
    k: int = 16  # topk / batchtopk
    l1_coefficient: float = 5.0  # standard
    l0_coefficient: float = 1.0  # jumprelu
    l1_warmup_fraction: float = 0.05  # warm-up of the sparsity penalty (L1 or L0)
    steps: int = 2000
    batch_size: int = 1024
    lr: float = 1e-3
    lr_warmup_steps: int = 0
    lr_decay_fraction: float = 0.2  # linear decay to 0 over the last part of training
    aux_k_coefficient: float = 1 / 32
    dead_tokens: int = 20_000  # a feature that has not fired for this many tokens is dead
    resample_every: int = 500  # standard only; 0 disables resampling
    jumprelu_init_threshold: float = 0.01  # SAELens 6 defaults
    jumprelu_bandwidth: float = 0.05
    topk_threshold_lr: float = 0.01  # batchtopk: step size of the running threshold estimate
    hook_name: str | None = None
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 0  # 0: only on cancel (when a checkpoint folder is given)

    def __post_init__(self):
        if self.architecture not in TRAIN_ARCHITECTURES:
            raise SAEError(f"Training supports the {', '.join(TRAIN_ARCHITECTURES)} architectures, not "
                           f"{self.architecture!r}.")
        if self.d_sae < 1 or self.steps < 1 or self.batch_size < 1:
            raise SAEError("d_sae, steps and batch_size must be positive to train an SAE.")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.d_sae:
            raise SAEError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}.")
        if self.lr_warmup_steps < 0 or not 0 <= self.lr_decay_fraction <= 1:
            raise SAEError("lr_warmup_steps must be >= 0 and lr_decay_fraction between 0 and 1.")
        if self.architecture == "jumprelu" and (self.jumprelu_bandwidth <= 0 or self.jumprelu_init_threshold <= 0):
            raise SAEError("jumprelu_bandwidth and jumprelu_init_threshold must be positive.")


@dataclass
class TrainMetrics:
    step: int
    loss: float
    l0: float
    explained_variance: float
    dead_fraction: float
    mse: float = 0.0
    aux_loss: float = 0.0
    lr: float = 0.0


@dataclass
class TrainResult:
    sae: SAE
    history: list[TrainMetrics] = field(default_factory=list)
    steps_done: int = 0
    cancelled: bool = False
    elapsed_s: float = 0.0
    scaling_factor: float = 1.0
    resumed_from: int = 0  # the step the run was resumed at (0: a fresh run)
    checkpoint: str = ""  # the newest checkpoint written, if any


# ---- activations source: a tensor in memory or cached rows on disk ------------------------------------------

class _TensorRows:
    def __init__(self, x: torch.Tensor):
        self.x = x.detach().float().cpu()

    def __len__(self):
        return self.x.shape[0]

    @property
    def width(self):
        return self.x.shape[1]

    def rows(self, index):
        return self.x[index]

    def chunks(self, size=8192):
        for start in range(0, len(self), size):
            yield self.x[start:start + size]


def as_rows(acts):
    if isinstance(acts, torch.Tensor):
        if acts.dim() != 2:
            raise SAEError(f"Training needs activations shaped [tokens, d_in], got {tuple(acts.shape)}.")
        return _TensorRows(acts)
    return acts


def _input_statistics(rows) -> tuple[float, torch.Tensor]:
    """Mean L2 norm and mean vector of all rows, accumulated in float64 chunk by chunk."""
    norm_sum, total, n = 0.0, torch.zeros(rows.width, dtype=torch.float64), 0
    for chunk in rows.chunks():
        norm_sum += float(chunk.double().norm(dim=-1).sum())
        total += chunk.double().sum(0)
        n += chunk.shape[0]
    return norm_sum / max(n, 1), (total / max(n, 1)).float()


# ---- JumpReLU straight-through estimators ------------------------------------------------------------------

def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre * H(pre - theta); d/dpre = H, d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return pre * (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = (pre > theta).to(pre.dtype) * grad
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    """H(pre - theta); no gradient to pre, d/dtheta = -(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre, theta, bandwidth):
        ctx.save_for_backward(pre, theta)
        ctx.bandwidth = bandwidth
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_theta = (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return None, grad_theta, None


# ---- pieces of a step --------------------------------------------------------------------------------------

def _init_sae(cfg: TrainConfig, d_in: int, mean: torch.Tensor, gen: torch.Generator) -> SAE:
    arch = {"batchtopk": "jumprelu"}.get(cfg.architecture, cfg.architecture)
    sae = SAE(SAEConfig(architecture=arch, d_in=d_in, d_sae=cfg.d_sae, hook_name=cfg.hook_name,
                        k=cfg.k if arch == "topk" else None, apply_b_dec_to_input=True))
    with torch.no_grad():
        w_dec = torch.randn(cfg.d_sae, d_in, generator=gen)
        w_dec /= w_dec.norm(dim=-1, keepdim=True)
        if cfg.architecture == "standard":
            w_dec *= 0.1
        sae.W_dec.copy_(w_dec)
        sae.W_enc.copy_(w_dec.T)
        sae.b_dec.copy_(mean)
    return sae


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.lr_warmup_steps:
        return cfg.lr * (step + 1) / cfg.lr_warmup_steps
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


def _batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations keeping the k * batch largest of relu(pre) over the whole batch, smallest kept value)."""
    acts = torch.relu(pre)
    flat = acts.flatten()
    values, indices = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    kept = torch.zeros_like(flat).scatter(-1, indices, values).reshape(pre.shape)
    positive = values[values > 0]
    return kept, positive.min().detach() if positive.numel() else pre.new_zeros(())


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


# ---- the training state, for checkpoints -------------------------------------------------------------------

class _State:
    """Everything that changes during training, in one place so that a checkpoint holds all of it."""

    def __init__(self, cfg: TrainConfig, rows, gen: torch.Generator):
        self.cfg, self.gen = cfg, gen
        self.n = len(rows)
        mean_norm, mean = _input_statistics(rows)
        self.scale = math.sqrt(rows.width) / max(mean_norm, 1e-12)
        self.sae = _init_sae(cfg, rows.width, mean * self.scale, gen).requires_grad_(True)
        self.params = {name: p for name, p in self.sae.named_parameters() if name != "threshold"}
        if hasattr(self.sae, "threshold"):
            self.sae.threshold.requires_grad_(False)  # trained in log space (jumprelu) or estimated (batchtopk)
        if cfg.architecture == "jumprelu":
            self.log_threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.jumprelu_init_threshold)))
            self.params["log_threshold"] = self.log_threshold
        self.opt = torch.optim.Adam(list(self.params.values()), lr=cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.order, self.cursor = torch.randperm(self.n, generator=gen), 0
        self.topk_threshold = torch.zeros(())
        self.step = 0
        self.history: list[TrainMetrics] = []

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"param.{k}": p.detach() for k, p in self.params.items()}
        for k, p in self.params.items():
            state = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq", "step"):
                if key in state:
                    out[f"adam.{k}.{key}"] = torch.as_tensor(state[key], dtype=torch.float32 if key == "step"
                                                             else None).detach().clone()
        out.update({"rng": self.gen.get_state(), "order": self.order, "since_fired": self.since_fired,
                    "topk_threshold": self.topk_threshold})
        return out

    def info(self) -> dict:
        return {"config": asdict(self.cfg), "step": self.step, "cursor": self.cursor, "scale": self.scale,
                "n_rows": self.n, "history": [asdict(m) for m in self.history]}

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], info: dict) -> None:
        if int(info["n_rows"]) != self.n:
            raise SAEError(f"The checkpoint was trained on {info['n_rows']} activations but this run has {self.n}; "
                           "resume on the same corpus and hook.")
        for k, p in self.params.items():
            p.copy_(tensors[f"param.{k}"])
            if f"adam.{k}.exp_avg" in tensors:
                self.opt.state[p] = {"step": tensors[f"adam.{k}.step"].clone(),
                                     "exp_avg": tensors[f"adam.{k}.exp_avg"].clone(),
                                     "exp_avg_sq": tensors[f"adam.{k}.exp_avg_sq"].clone()}
        self.gen.set_state(tensors["rng"])
        self.order = tensors["order"].clone()
        self.since_fired = tensors["since_fired"].clone()
        self.topk_threshold = tensors["topk_threshold"].clone()
        self.step, self.cursor, self.scale = int(info["step"]), int(info["cursor"]), float(info["scale"])
        self.history = [TrainMetrics(**m) for m in info["history"]]


# ---- the job -----------------------------------------------------------------------------------------------

def train_sae(acts, cfg: TrainConfig, cancel: CancelToken | None = None, *, checkpoint_dir=None, resume_from=None):
    """Job: trains an SAE on activations [n, d_in] (a tensor, or ActivationRows from the activation cache);
    yields Progress and TrainMetrics; returns TrainResult."""
    rows = as_rows(acts)
    if len(rows) < 2:
        raise SAEError(f"Training needs at least 2 activations, got {len(rows)}.")
    cancel = cancel or CancelToken()
    started = time.perf_counter()
    with _grad_mode():
        st = _State(cfg, rows, torch.Generator().manual_seed(cfg.seed))
        if resume_from is not None:
            st.restore(*load_checkpoint(resume_from, cfg))
    result = TrainResult(sae=st.sae, scaling_factor=st.scale, resumed_from=st.step, history=st.history)
    batch = min(cfg.batch_size, st.n)
    ckpt_root = Path(checkpoint_dir) if checkpoint_dir is not None else None
    yield Progress(st.step, cfg.steps, "training SAE" + (f" (resumed at step {st.step})" if st.step else ""))

    sae = st.sae
    while st.step < cfg.steps:
        if cancel.cancelled:
            result.cancelled = True
            break
        step = st.step
        with _grad_mode():
            loss, mse, aux, f, x_hat, x, lr = _train_step(st, rows, batch, step)
        st.step = step + 1
        result.steps_done = st.step
        if step == 0 or st.step % cfg.log_every == 0 or st.step == cfg.steps:
            with torch.no_grad():
                metrics = TrainMetrics(
                    step=st.step, loss=float(loss), l0=float((f != 0).sum(dim=-1).float().mean()),
                    explained_variance=explained_variance(x, x_hat),
                    dead_fraction=float((st.since_fired >= cfg.dead_tokens).float().mean()),
                    mse=float(mse), aux_loss=float(aux), lr=lr)
            st.history.append(metrics)
            yield metrics
            yield Progress(st.step, cfg.steps, f"step {st.step}/{cfg.steps}  loss {metrics.loss:.4g}  "
                                               f"L0 {metrics.l0:.1f}  EV {metrics.explained_variance:.3f}")
        if ckpt_root is not None and cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 \
                and st.step < cfg.steps:
            result.checkpoint = str(save_checkpoint(ckpt_root, st.step, st.tensors(), st.info()))

    if result.cancelled and ckpt_root is not None:
        result.checkpoint = str(save_checkpoint(ckpt_root, st.step, st.tensors(), st.info()))
    with _grad_mode():
        result.sae = _finished_sae(st)
    result.elapsed_s = time.perf_counter() - started
    return result



@contextlib.contextmanager
def _grad_mode():
    """Training needs autograd even when the caller (the window's worker) runs jobs in inference mode."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def optimizer_step(opt: torch.optim.Adam, params: list, loss: torch.Tensor, step: int) -> None:
    """One Adam step on `loss` with the gradient norm clipped to 1 (the SAE and transcoder trainers' update)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 32 == 31:
        _flush_tiny_optimizer_state(opt)


def _train_step(st: _State, rows, batch: int, step: int):
    """One optimiser step (data, loss, update, decoder norm, dead-feature bookkeeping, resampling)."""
    cfg = st.cfg
    if st.cursor + batch > st.n:
        st.order, st.cursor = torch.randperm(st.n, generator=st.gen), 0
    x = rows.rows(st.order[st.cursor:st.cursor + batch]) * st.scale
    st.cursor += batch
    lr = _lr_at(step, cfg)
    for group in st.opt.param_groups:
        group["lr"] = lr
    loss, mse, aux, f, x_hat = _loss(st, x, step)
    optimizer_step(st.opt, list(st.params.values()), loss, step)
    with torch.no_grad():
        if cfg.architecture != "standard":
            st.sae.W_dec /= st.sae.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        fired = (f != 0).any(dim=0)
        st.since_fired += batch
        st.since_fired[fired] = 0

    if cfg.architecture == "standard" and cfg.resample_every and (step + 1) % cfg.resample_every == 0 \
            and step + 1 < cfg.steps * 0.8:
        dead_now = st.since_fired >= min(cfg.dead_tokens, cfg.resample_every * batch)
        sample = rows.rows(torch.randint(0, st.n, (min(st.n, 8192),), generator=st.gen)) * st.scale
        _resample_dead(st.sae, st.opt, sample, dead_now, st.gen)
        st.since_fired[dead_now] = 0
    return loss, mse, aux, f, x_hat, x, lr


def _loss(st: _State, x: torch.Tensor, step: int):
    """(loss, mse, auxiliary / sparsity term, feature activations, reconstruction) of one batch."""
    cfg, sae = st.cfg, st.sae
    pre = sae._hidden_pre(x)
    warm = min(1.0, (step + 1) / max(1, cfg.steps * cfg.l1_warmup_fraction))
    dead = st.since_fired >= cfg.dead_tokens
    if cfg.architecture == "jumprelu":
        theta = st.log_threshold.exp()
        f = _JumpReLU.apply(pre, theta, cfg.jumprelu_bandwidth)
        aux = _Step.apply(pre, theta, cfg.jumprelu_bandwidth).sum(dim=-1).mean()
    elif cfg.architecture == "batchtopk":
        f, smallest = _batch_topk(pre, cfg.k)
        with torch.no_grad():
            st.topk_threshold = st.topk_threshold + cfg.topk_threshold_lr * (smallest - st.topk_threshold) \
                if step else smallest.clone()
    elif cfg.architecture == "topk":
        f = sae._activate(x, pre)
    else:
        f = torch.relu(pre)
    x_hat = f @ sae.W_dec + sae.b_dec
    mse = (x_hat - x).pow(2).sum(dim=-1).mean()
    if cfg.architecture in ("topk", "batchtopk"):
        aux = _aux_k_loss(sae, x, x_hat, pre, dead)
        loss = mse + cfg.aux_k_coefficient * aux
    elif cfg.architecture == "jumprelu":
        loss = mse + cfg.l0_coefficient * warm * aux
    else:
        aux = (f * sae.W_dec.norm(dim=-1)).sum(dim=-1).mean()
        loss = mse + cfg.l1_coefficient * warm * aux
    return loss, mse, aux, f, x_hat.detach()


def _finished_sae(st: _State) -> SAE:
    """A copy of the SAE that reads raw activations: JumpReLU thresholds from log space, the BatchTopK
    threshold as every feature's JumpReLU threshold, the training scale folded into the weights."""
    import copy

    sae = copy.deepcopy(st.sae).requires_grad_(False)
    with torch.no_grad():
        if st.cfg.architecture == "jumprelu":
            sae.threshold.copy_(st.log_threshold.detach().exp())
        elif st.cfg.architecture == "batchtopk":
            sae.threshold.fill_(float(st.topk_threshold))
    sae.cfg.normalize_activations = "expected_average_only_in"
    sae.cfg.norm_scaling_factor = st.scale
    sae.fold_scaling_factor()
    sae.cfg.metadata = {**sae.cfg.metadata, "trained_architecture": st.cfg.architecture}
    return sae.eval()
