"""L2-regularised multinomial logistic regression, fitted with L-BFGS in float64 (torch only).

scikit-learn would add ~40 MB (with scipy) for one convex fit; this is the same objective as its
`LogisticRegression(C=1 / (l2 * n))` with the intercept unpenalised, on standardised features:

    minimise  mean_i CE(softmax(W z_i + b), y_i) + l2 / 2 * ||W||^2,   z = (x - mean) / std

The weights are mapped back to the raw activations (`coef`, `intercept`) so that a probe direction lives in
the model's space. The fit is checked: a largest gradient entry above max(1000 tol, 1e-6) after max_iter is reported as not
converged (the caller decides to refuse).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class LogisticModel:
    coef: np.ndarray  # [class, width], on raw features
    intercept: np.ndarray  # [class]
    classes: np.ndarray  # the class index each row of coef stands for (0 .. K-1)
    grad_norm: float  # of the objective at the solution
    converged: bool

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) @ self.coef.T + self.intercept

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.logits(x), axis=1)]

    def direction(self) -> np.ndarray:
        """Binary: the unit normal pointing toward class 1 ([width]); K classes: each class's row, unit norm."""
        if len(self.classes) == 2:
            w = self.coef[1] - self.coef[0]
            return w / max(np.linalg.norm(w), 1e-30)
        return self.coef / np.maximum(np.linalg.norm(self.coef, axis=1, keepdims=True), 1e-30)


def objective(W: torch.Tensor, b: torch.Tensor, z: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(z @ W.T + b, y) + 0.5 * l2 * (W * W).sum()


def fit_logistic(x: np.ndarray, y: np.ndarray, n_classes: int | None = None, l2: float = 1e-2,
                 max_iter: int = 1000, tol: float = 1e-9) -> LogisticModel:
    """Fit on x [n, width] and integer labels y [n] in 0 .. K-1."""
    # the window's worker runs jobs under inference_mode, where no tensor can take part in autograd
    with torch.inference_mode(False), torch.enable_grad():
        return _fit(x, y, n_classes, l2, max_iter, tol)


def _fit(x, y, n_classes, l2, max_iter, tol) -> LogisticModel:
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    k = int(n_classes if n_classes is not None else int(y_t.max()) + 1)
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-12 * (1 + mean.abs()), std, torch.ones_like(std))
    z = (x - mean) / std
    W = torch.zeros(k, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-14,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = objective(W, b, z, y_t, l2)
        loss.backward()
        return loss

    opt.step(closure)
    opt.zero_grad()
    objective(W, b, z, y_t, l2).backward()
    grad_norm = float(torch.cat([W.grad.flatten(), b.grad]).abs().max())
    Wd, bd = W.detach(), b.detach()
    coef = (Wd / std).numpy()
    intercept = (bd - (Wd * mean / std).sum(1)).numpy()
    return LogisticModel(coef=coef, intercept=intercept, classes=np.arange(k), grad_norm=grad_norm,
                         converged=grad_norm <= max(tol * 1000, 1e-6))


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[true class, predicted class] counts."""
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m
