"""Linear probes per layer (the `probe` kind): does a layer's activation linearly encode a label?

    result = drive(probe_job(lm, "sentiment.csv", hook="resid_post", position="last", test_fraction=0.25, seed=0))
    result.values                      # [layer] held-out accuracy
    result.extras["control_accuracy"]  # [layer] the same probe on shuffled labels (Hewitt & Liang control task)
    result.extras["selectivity"]       # [layer] accuracy - control accuracy
    result.extras["confusion"]         # [layer, true class, predicted class] on the test split
    result.extras["coef"], ["intercept"]  # the probes [layer, class, width], [layer, class], on raw activations
    result.extras["directions"]        # unit normals: [layer, width] toward the second class (two classes),
                                       # else [layer, class, width]

The split is stratified and seeded: each class contributes round(test_fraction * count) test examples, at
least one, and keeps at least one for training. The control task gives each example a label drawn by a
seeded permutation of the real labels (same class sizes, no relation to the text) — the sentence-level analogue
of Hewitt & Liang's per-word-type control labels.
"""
from __future__ import annotations

import os
import time

import numpy as np

from desktop_app.engine.activations_dataset import check_layer_kind, collect_pooled
from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import CancelToken, Partial, Progress
from desktop_app.engine.logistic import confusion_matrix, fit_logistic
from desktop_app.engine.results import AnalysisResult, empty_values
from desktop_app.engine.text_data import read_labelled_dataset


def encode_labels(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    classes = sorted(set(labels), key=lambda c: (not _is_number(c), float(c) if _is_number(c) else 0.0, c))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in labels], dtype=np.int64), classes


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, test indices), sorted; SpecError when a class cannot give one train and one test example."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise SpecError(f"test_fraction must be between 0 and 1 (exclusive), not {test_fraction}.")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        if len(members) < 2:
            raise SpecError(f"class {int(c)} has {len(members)} example but the split needs at least 2 per class "
                            "(one to train, one to test); add examples.")
        members = rng.permutation(members)
        n_test = int(np.clip(round(test_fraction * len(members)), 1, len(members) - 1))
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def fit_layer(acts: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, n_classes: int, l2: float):
    """(accuracy on test, confusion [K, K], model) of one layer's probe."""
    model = fit_logistic(acts[train], y[train], n_classes, l2=l2)
    pred = model.predict(acts[test])
    return float((pred == y[test]).mean()), confusion_matrix(y[test], pred, n_classes), model


def probe_job(lm, dataset, hook: str = "resid_post", position: str = "last", test_fraction: float = 0.25,
              seed: int = 0, l2: float = 1e-2, batch_size: int = 16, cache_dir=None,
              cancel: CancelToken | None = None, name: str = "probe", prepend_bos: bool | None = None):
    """Job: the `probe` analysis. `dataset` is a CSV/JSONL path with text,label or a list of (text, label)."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    kind = check_layer_kind(lm, hook)
    texts, labels = read_labelled_dataset(dataset)
    y, classes = encode_labels(labels)
    if len(classes) < 2:
        raise SpecError(f"the dataset has only one label ({classes[0]!r}); a probe needs examples of at least two "
                        "classes.")
    train, test = stratified_split(y, test_fraction, seed)
    control_y = np.random.default_rng([seed, 1]).permutation(y)
    acts = yield from collect_pooled(lm, texts, kind, position, batch_size, cache_dir, cancel, prepend_bos,
                                     what="dataset text")
    n_layers, k = acts.shape[0], len(classes)
    accuracy, control = empty_values((n_layers,)), empty_values((n_layers,))
    confusion = np.zeros((n_layers, k, k), dtype=np.int64)
    coef = np.zeros((n_layers, k, acts.shape[2]), dtype=np.float32)
    intercept = np.zeros((n_layers, k), dtype=np.float32)
    grad_norm = np.zeros(n_layers, dtype=np.float32)
    directions = np.zeros((n_layers,) + ((acts.shape[2],) if k == 2 else (k, acts.shape[2])), dtype=np.float32)
    for layer in range(n_layers):
        cancel.check()
        yield Progress(layer, n_layers, f"fitting the probe of layer {layer}")
        acc, conf, model = fit_layer(acts[layer], y, train, test, k, l2)
        control_acc, _, control_model = fit_layer(acts[layer], control_y, train, test, k, l2)
        if not (model.converged and control_model.converged):
            raise SpecError(f"the probe of layer {layer} did not converge (gradient {max(model.grad_norm, control_model.grad_norm):.2g}); "
                            "raise l2.")
        accuracy[layer], control[layer], confusion[layer] = acc, control_acc, conf
        coef[layer], intercept[layer], grad_norm[layer] = model.coef, model.intercept, model.grad_norm
        directions[layer] = model.direction()
        yield Partial(index=(np.array([layer]),), values=np.array([acc], dtype=np.float32))
    yield Progress(n_layers, n_layers, "done")
    majority = float(np.bincount(y[test], minlength=k).max() / len(test))
    return AnalysisResult(
        name=name, kind="probe",
        params=dict(dataset=str(dataset) if isinstance(dataset, (str, os.PathLike)) else "inline",
                    hook=kind, position=position, test_fraction=float(test_fraction), seed=int(seed), l2=float(l2)),
        dims=["layer"], values=accuracy, labels={"layer": [str(i) for i in range(n_layers)]},
        elapsed_s=time.perf_counter() - t0,
        extras={"control_accuracy": control, "selectivity": (accuracy - control).astype(np.float32),
                "confusion": confusion, "classes": np.array(classes, dtype=str),
                "coef": coef, "intercept": intercept, "directions": directions,
                "train_index": train, "test_index": test, "majority_accuracy": np.array(majority, dtype=np.float32),
                "grad_norm": grad_norm})
