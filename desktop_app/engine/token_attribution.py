"""Token attribution: which input tokens the prediction at the last position rests on.

Every method works on the token embeddings (the output of the embedding module, `hook_embed`; positional
embeddings are added after it and kept). "Removing" a token means replacing its embedding by the baseline's:
the embedding of the pad token (or, when the tokenizer has none, of its unk / eos / bos token, named in the
result's message), the zero vector, or the embedding of a literal single token. The target is read at the
last position: logit_diff = logit(answer) - logit(wrong), answer_logit, answer_prob, or a metric expression
(contract 6.2, e.g. {"expression": "prob(answer) / prob(wrong)"}), evaluated on the logits with torch so that it
is differentiated like the built-ins.

- saliency: the L2 norm over d_model of the target's gradient at each token's embedding.
- grad_x_input: gradient . embedding.
- integrated_gradients (Sundararajan et al. 2017): (x - x') . sum_i w_i grad f(x' + a_i (x - x')), with the
  nodes a_i and weights w_i of Gauss-Legendre or a Riemann rule (as Captum names them); all steps of a chunk
  go through ONE batched forward and backward pass. convergence_delta = sum(attributions) - (f(x) - f(x')).
- occlusion: windows of `window` tokens sliding by one are replaced by the baseline; a token's value is the
  mean drop f(x) - f(occluded) over the windows that cover it.
- shap: Shapley values of the tokens as players, v(S) = f(inputs with the tokens outside S removed). Exact
  (all 2^n coalitions) up to MAX_EXACT_SHAP tokens; above, permutation sampling with `samples` model
  evaluations (samples // n permutations, seeded).
- lime (Ribeiro et al. 2016): `samples` random masks (the number of removed tokens uniform in 1..n, seeded),
  kernel exp(-d^2 / 25^2) on the cosine distance x 100 to the full input, weighted ridge (alpha 1) with an
  intercept; the coefficients are the attributions.

Faithfulness: deletion_curve[k] is the target after removing the k most attributed tokens (k = 0..n); the
sanity rule requires that removing the top token moves the target (the message says so when it does not).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from desktop_app.engine.capture import forward_logits, hooks
from desktop_app.engine.errors import JobCancelled, SpecError
from desktop_app.engine.hooknames import EMBED
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.memory import rows_per_batch
from desktop_app.engine.metric_expr import BoundMetric, MetricExpression, TokenSets, parse_metric
from desktop_app.engine.model import TokenInfo
from desktop_app.engine.results import AnalysisResult, empty_values

METHODS = ("saliency", "grad_x_input", "integrated_gradients", "occlusion", "shap", "lime")
TARGETS = ("logit_diff", "answer_logit", "answer_prob")
INTEGRATIONS = ("gausslegendre", "riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
MAX_EXACT_SHAP = 12
LIME_KERNEL_WIDTH = 25.0
LIME_RIDGE_ALPHA = 1.0


def target_metric(lm, target):
    """None for a built-in target name; else the target as a metric expression (contract 6.2: a text, a
    {"expression": ...} object or a MetricExpression) bound to the model's vocabulary."""
    if isinstance(target, str) and target in TARGETS:
        return None
    if isinstance(target, BoundMetric):
        return target
    expr = parse_metric(target)
    if not isinstance(expr, MetricExpression):
        raise SpecError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)} or write "
                        "{\"expression\": \"logit(answer) - logit(wrong)\"}.")
    return expr.bind(lm.single_token_id)


def target_label(target) -> str:
    """The target as a result's params record it: the built-in name or the expression's text."""
    if isinstance(target, BoundMetric):
        return target.expr.text
    expr = parse_metric(target) if not (isinstance(target, str) and target in TARGETS) else target
    return expr.text if isinstance(expr, MetricExpression) else str(expr)


def integration_rule(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(nodes in [0, 1], weights) of an integration rule over [0, 1] with `steps` points (Captum's names)."""
    n = int(steps)
    if n < 1 or (method == "riemann_trapezoid" and n < 2):
        raise SpecError(f"steps must be at least {2 if method == 'riemann_trapezoid' else 1}, not {steps}.")
    if method == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(n)
        return 0.5 * (x + 1.0), 0.5 * w
    if method == "riemann_trapezoid":
        w = np.full(n, 1.0 / (n - 1))
        w[0] = w[-1] = 0.5 / (n - 1)
        return np.linspace(0.0, 1.0, n), w
    w = np.full(n, 1.0 / n)
    if method == "riemann_left":
        return np.linspace(0.0, 1.0 - 1.0 / n, n), w
    if method == "riemann_right":
        return np.linspace(1.0 / n, 1.0, n), w
    if method == "riemann_middle":
        return np.linspace(0.5 / n, 1.0 - 0.5 / n, n), w
    raise SpecError(f"unknown integration {method!r}; choose one of {', '.join(INTEGRATIONS)}.")


class EmbeddingTarget:
    """The target at the last position as a function of the token embeddings [rows, pos, d_model]."""

    def __init__(self, lm, ids: list[int], target: str, answer_id: int, wrong_id: int | None,
                 cancel: CancelToken, batch_size: int | None = None):
        self.bound = target_metric(lm, target)
        if self.bound is not None:  # an expression: answer / wrong as TokenSets (one row), None where not given
            answer_id = None if answer_id is None else TokenSets.of([answer_id])
            wrong_id = None if wrong_id is None else TokenSets.of([wrong_id])
        elif answer_id is None:
            raise SpecError("token attribution needs an answer token; type one.")
        elif target == "logit_diff" and (wrong_id is None or wrong_id == answer_id):
            raise SpecError("the logit_diff target needs a wrong answer different from the answer; type one or "
                            "choose answer_logit.")
        else:
            answer_id = int(answer_id)
        self.lm, self.target, self.a, self.w, self.cancel = lm, target, answer_id, wrong_id, cancel
        self.ids = torch.tensor([ids], device=lm.input_device)
        self.rows = batch_size or max(1, rows_per_batch(lm, len(ids)))
        with torch.inference_mode(False), torch.no_grad():
            self.embeds = lm.adapter.embed(self.ids)[0].detach().clone()  # [pos, d]

    def token_embedding(self, token_id: int) -> torch.Tensor:
        with torch.inference_mode(False), torch.no_grad():
            return self.lm.adapter.embed(torch.tensor([[int(token_id)]], device=self.ids.device))[0, 0].detach().clone()

    def _metric(self, logits: torch.Tensor) -> torch.Tensor:
        if self.bound is not None:
            rows = logits.shape[0]
            answer = None if self.a is None else TokenSets(self.a.ids.expand(rows, -1), self.a.mask.expand(rows, -1))
            wrong = None if self.w is None else TokenSets(self.w.ids.expand(rows, -1), self.w.mask.expand(rows, -1))
            values, zero = self.bound(logits, answer, wrong)
            if bool(zero.any()):
                raise SpecError(f"the target \"{self.bound.expr.text}\" divides by zero for {int(zero.sum())} of "
                                f"{rows} inputs, so its attributions are undefined; change the expression.")
            return values
        logits = logits.float()
        if self.target == "logit_diff":
            return logits[:, self.a] - logits[:, self.w]
        if self.target == "answer_logit":
            return logits[:, self.a]
        return torch.softmax(logits, -1)[:, self.a]

    def _forward(self, embeds: torch.Tensor) -> torch.Tensor:
        rows = embeds.shape[0]
        with hooks(self.lm, write={EMBED: lambda _act: embeds}, cancel=self.cancel):
            logits = forward_logits(self.lm, self.ids.expand(rows, -1), last_only=True)[:, -1]
        return self._metric(logits)

    def values(self, embeds: torch.Tensor) -> torch.Tensor:
        """Target per row (float64, CPU), in chunks of self.rows."""
        out = []
        with torch.inference_mode(False), torch.no_grad():
            for chunk in embeds.split(self.rows):
                self.cancel.check()
                out.append(self._forward(chunk).double().cpu())
        return torch.cat(out)

    def grads(self, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(target per row (float64, CPU), its gradient at each row's embeddings [rows, pos, d] on the model's
        device) from one forward and one backward pass for the whole batch (rows are independent, so the
        gradient of the sum is per row)."""
        with torch.inference_mode(False), torch.enable_grad():
            leaf = embeds.detach().clone().requires_grad_(True)
            value = self._forward(leaf)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
        return value.detach().double().cpu(), grad.detach()


def baseline_embedding(lm, target: EmbeddingTarget, baseline: str) -> tuple[torch.Tensor, str]:
    """(baseline embedding [d_model], a note naming the token used when it is not the literal choice)."""
    if baseline == "zero":
        return torch.zeros_like(target.embeds[0]), ""
    if baseline == "pad":
        tok = lm.tokenizer
        for attr in ("pad_token_id", "unk_token_id", "eos_token_id", "bos_token_id"):
            token_id = getattr(tok, attr, None)
            if token_id is not None:
                note = "" if attr == "pad_token_id" else \
                    f"the tokenizer has no pad token; the baseline is its {attr[:-9]} token (id {token_id})."
                return target.token_embedding(token_id), note
        raise SpecError("the tokenizer has no pad, unk, eos or bos token; choose the zero baseline or a literal token.")
    if not isinstance(baseline, str) or not baseline:
        raise SpecError("baseline must be pad, zero or a single token of the vocabulary.")
    return target.token_embedding(lm.single_token_id(baseline, "baseline")), ""


def _masked(x: torch.Tensor, base: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Inputs [rows, pos, d]: the token's embedding where keep [rows, pos] is true, the baseline elsewhere."""
    keep = keep.to(x.device)[..., None]
    return torch.where(keep, x[None], base.to(x.device)[None, None])


def token_attribution_job(lm, tokens: TokenInfo, answer_id: int, wrong_id: int | None = None,
                          method: str = "integrated_gradients", target: str = "logit_diff", baseline: str = "pad",
                          steps: int = 50, integration: str = "gausslegendre", samples: int = 256, window: int = 1,
                          seed: int = 0, name: str = "token_attribution", prompt_label: str = "clean",
                          batch_size: int | None = None, cancel: CancelToken | None = None):
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if method not in METHODS:
        raise SpecError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if int(samples) < 2 and method in ("shap", "lime"):
        raise SpecError(f"samples must be at least 2, not {samples}.")
    n = len(tokens.ids)
    if not 1 <= int(window) <= n:
        raise SpecError(f"window must be between 1 and the prompt's {n} tokens, not {window}.")
    if method == "integrated_gradients":
        integration_rule(integration, steps)  # checks the settings before the model runs
    f = EmbeddingTarget(lm, tokens.ids, target, answer_id, wrong_id, cancel, batch_size)
    base, note = baseline_embedding(lm, f, baseline)
    values = empty_values((n,))
    result = AnalysisResult(
        name=name, kind="token_attribution",
        params=dict(method=method, prompt=prompt_label, target=target_label(target), baseline=baseline, steps=int(steps),
                    integration=integration, samples=int(samples), window=int(window), seed=int(seed)),
        dims=["position"], values=values, labels={"position": tokens.labels()},
        tokens_clean=np.array(tokens.ids, dtype=np.int64), message=note)
    method_job = _METHOD_JOBS[method]
    try:
        attributions = yield from method_job(f, base, result, steps=int(steps), integration=integration,
                                             samples=int(samples), window=int(window), seed=int(seed))
    except JobCancelled:
        result.status = "partial" if np.isfinite(values).any() else "cancelled"
        result.message = " ".join(m for m in (note, "cancelled before every sample was evaluated.") if m)
        result.elapsed_s = time.perf_counter() - t0
        return result
    values[:] = attributions
    yield Partial(index=(np.arange(n),), values=values.copy())
    yield Progress(1, 1, "deletion curve")
    _faithfulness(f, base, result)
    result.elapsed_s = time.perf_counter() - t0
    return result


def _faithfulness(f: EmbeddingTarget, base: torch.Tensor, result: AnalysisResult) -> None:
    values = result.values
    n = values.shape[0]
    order = np.argsort(-np.nan_to_num(values, nan=-np.inf), kind="stable")
    keep = torch.ones(n + 1, n, dtype=torch.bool)
    for k in range(1, n + 1):
        keep[k, torch.as_tensor(order[:k])] = False
    curve = f.values(_masked(f.embeds, base, keep)).numpy()
    result.extras["deletion_curve"] = curve.astype(np.float32)
    result.extras["deletion_order"] = order.astype(np.int64)
    result.clean_metric = float(curve[0])
    moved = float(curve[0] - curve[1])
    result.extras["sanity_delta"] = np.array([moved], dtype=np.float32)
    if not abs(moved) > 1e-6 * max(1.0, abs(float(curve[0]))):
        top = result.labels["position"][int(order[0])]
        warning = (f"sanity check failed: removing the most attributed token ({top}) does not move the target, "
                   "so these attributions do not explain it.")
        result.message = " ".join(m for m in (result.message, warning) if m)


# ---- gradient methods ----------------------------------------------------------------------------------------

def _saliency(f, base, result, **_):
    yield Progress(0, 1, "gradient")
    _, grad = f.grads(f.embeds[None])
    return grad[0].double().norm(dim=-1).cpu().numpy()


def _grad_x_input(f, base, result, **_):
    yield Progress(0, 1, "gradient")
    _, grad = f.grads(f.embeds[None])
    return (grad[0].double() * f.embeds.double()).sum(-1).cpu().numpy()


def _integrated_gradients(f, base, result, steps, integration, **_):
    alphas, weights = integration_rule(integration, steps)
    x, b = f.embeds, base.to(f.embeds.device)
    diff = (x - b[None]).double()
    total = torch.zeros_like(diff)  # on the model's device: only [pos, d] comes back
    rows = max(1, f.rows // 2)  # a backward pass holds the activations of the forward pass
    done = 0
    for start in range(0, len(alphas), rows):
        f.cancel.check()
        a = torch.tensor(alphas[start:start + rows], dtype=x.dtype, device=x.device)
        path = b[None, None] + a[:, None, None] * (x - b[None])[None]
        _, grad = f.grads(path)
        w = torch.tensor(weights[start:start + rows], dtype=torch.float64, device=grad.device)
        total += (grad.double() * w[:, None, None]).sum(0)
        done += len(a)
        yield Progress(done, len(alphas) + 1, f"integrated gradients: {done} of {len(alphas)} steps")
    attributions = (diff * total).sum(-1).cpu()
    ends = f.values(torch.stack([x, b[None].expand_as(x)]))
    result.extras["convergence_delta"] = np.array([float(attributions.sum() - (ends[0] - ends[1]))], dtype=np.float32)
    result.extras["baseline_target"] = np.array([float(ends[1])], dtype=np.float32)
    return attributions.numpy()


# ---- perturbation methods --------------------------------------------------------------------------------------

def _evaluate_masks(f, base, keep: torch.Tensor, what: str, progress_total: int | None = None, done: int = 0):
    """Targets [masks] of inputs with the tokens where keep [masks, pos] is false removed; yields Progress."""
    out = []
    total = progress_total or keep.shape[0]
    for chunk in keep.split(f.rows):
        out.append(f.values(_masked(f.embeds, base, chunk)))
        done += chunk.shape[0]
        yield Progress(done, total, f"{what}: {done} of {total} inputs")
    return torch.cat(out)


def _occlusion(f, base, result, window, **_):
    n = f.embeds.shape[0]
    starts = range(n - window + 1)
    keep = torch.ones(len(starts) + 1, n, dtype=torch.bool)
    for row, s in enumerate(starts, start=1):
        keep[row, s:s + window] = False
    sums, counts = np.zeros(n), np.zeros(n)
    values = result.values
    full = None
    done = 0
    for chunk_start in range(0, keep.shape[0], f.rows):
        chunk = keep[chunk_start:chunk_start + f.rows]
        v = (yield from _evaluate_masks(f, base, chunk, "occlusion", keep.shape[0], done)).numpy()
        done += chunk.shape[0]
        if full is None:
            full, v, chunk = v[0], v[1:], chunk[1:]
        removed = (~chunk).numpy()
        sums += ((full - v)[:, None] * removed).sum(0)
        counts += removed.sum(0)
        seen = counts > 0
        values[seen] = (sums[seen] / counts[seen]).astype(np.float32)  # partial values survive a cancel
        yield Partial(index=(np.nonzero(seen)[0],), values=values[seen].copy())
    return sums / counts


def shapley_from_table(table: np.ndarray, n: int) -> np.ndarray:
    """Exact Shapley values from v over all 2^n coalitions (table[mask], bit i = player i present)."""
    masks = np.arange(1 << n)
    sizes = np.array([bin(m).count("1") for m in masks])
    weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) if s < n else 0.0
                       for s in range(n + 1)])
    phi = np.zeros(n)
    for i in range(n):
        without = masks[(masks >> i) & 1 == 0]
        phi[i] = (weight[sizes[without]] * (table[without | (1 << i)] - table[without])).sum()
    return phi


def _shap(f, base, result, samples, seed, **_):
    n = f.embeds.shape[0]
    if n <= MAX_EXACT_SHAP:
        masks = np.arange(1 << n)
        keep = torch.as_tensor(((masks[:, None] >> np.arange(n)[None]) & 1).astype(bool))
        table = (yield from _evaluate_masks(f, base, keep, "exact Shapley")).numpy()
        result.extras["shap_exact"] = np.array([1], dtype=np.int64)
        return shapley_from_table(table, n)
    rng = np.random.default_rng(seed)
    n_perm = max(1, samples // n)
    phi, done_perm = np.zeros(n), 0
    values = result.values
    per_batch = max(1, f.rows // (n + 1))
    for start in range(0, n_perm, per_batch):
        perms = [rng.permutation(n) for _ in range(min(per_batch, n_perm - start))]
        keep = torch.zeros(len(perms), n + 1, n, dtype=torch.bool)
        for r, perm in enumerate(perms):
            for j in range(1, n + 1):
                keep[r, j, torch.as_tensor(perm[:j])] = True
        v = (yield from _evaluate_masks(f, base, keep.reshape(-1, n), "Shapley permutations", n_perm * (n + 1),
                                        start * (n + 1))).numpy().reshape(len(perms), n + 1)
        for r, perm in enumerate(perms):
            phi[perm] += v[r, 1:] - v[r, :-1]
        done_perm += len(perms)
        values[:] = (phi / done_perm).astype(np.float32)  # the estimate so far survives a cancel
        yield Partial(index=(np.arange(n),), values=values.copy())
    result.extras["shap_exact"] = np.array([0], dtype=np.int64)
    result.extras["shap_permutations"] = np.array([done_perm], dtype=np.int64)
    return phi / done_perm


def lime_masks(n: int, samples: int, seed: int) -> np.ndarray:
    """[samples, n] bool: the full input first, then masks with a uniform number (1..n) of removed tokens."""
    rng = np.random.default_rng(seed)
    keep = np.ones((samples, n), dtype=bool)
    for row in range(1, samples):
        removed = rng.integers(1, n + 1)
        keep[row, rng.choice(n, size=removed, replace=False)] = False
    return keep


def weighted_ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Coefficients of argmin sum w (y - c - x b)^2 + alpha |b|^2 with a free intercept c."""
    xm = (w[:, None] * x).sum(0) / w.sum()
    ym = (w * y).sum() / w.sum()
    xc, yc = x - xm, y - ym
    a = xc.T @ (w[:, None] * xc) + alpha * np.eye(x.shape[1])
    return np.linalg.solve(a, xc.T @ (w * yc))


def lime_weights(keep: np.ndarray) -> np.ndarray:
    k = keep.astype(np.float64)
    cos = k.sum(1) / (np.sqrt(k.sum(1)) * math.sqrt(k.shape[1]) + 1e-12)
    distance = (1.0 - cos) * 100.0
    return np.sqrt(np.exp(-(distance ** 2) / LIME_KERNEL_WIDTH ** 2))


def _lime(f, base, result, samples, seed, **_):
    n = f.embeds.shape[0]
    keep = lime_masks(n, samples, seed)
    weights = lime_weights(keep)
    x = keep.astype(np.float64)
    y = np.zeros(samples)
    values = result.values
    for start in range(0, samples, f.rows):
        stop = min(samples, start + f.rows)
        chunk = torch.as_tensor(keep[start:stop])
        y[start:stop] = (yield from _evaluate_masks(f, base, chunk, "LIME", samples, start)).numpy()
        if stop >= 2:  # the fit on the samples so far survives a cancel
            values[:] = weighted_ridge(x[:stop], y[:stop], weights[:stop], LIME_RIDGE_ALPHA).astype(np.float32)
            yield Partial(index=(np.arange(n),), values=values.copy())
    result.extras["lime_samples"] = np.array([samples], dtype=np.int64)
    return weighted_ridge(x, y, weights, LIME_RIDGE_ALPHA)


_METHOD_JOBS = {"saliency": _saliency, "grad_x_input": _grad_x_input, "integrated_gradients": _integrated_gradients,
                "occlusion": _occlusion, "shap": _shap, "lime": _lime}
