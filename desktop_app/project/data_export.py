"""Export one AnalysisResult as data: CSV (one row per cell) or NPZ (the arrays of contract section 3)."""
from __future__ import annotations

import csv
import io
import itertools
import os
from pathlib import Path

import numpy as np

from desktop_app.engine.errors import ProjectFileError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project.atomic import atomic_write


def dim_labels(result: AnalysisResult, dim: str) -> list[str]:
    """Labels of `dim` as strings, one per index; indices where none was given are labelled by number."""
    n = result.values.shape[result.dims.index(dim)]
    given = list(result.labels.get(dim, []))
    return [str(given[i]) if i < len(given) else str(i) for i in range(n)]


def npz_arrays(result: AnalysisResult) -> dict[str, np.ndarray]:
    arrays = {
        "values": np.asarray(result.values),
        "tokens_clean": np.asarray(result.tokens_clean, dtype=np.int64),
        "tokens_corrupted": np.asarray(result.tokens_corrupted, dtype=np.int64),
        "clean_metric": np.asarray(result.clean_metric, dtype=np.float64),
        "corrupted_metric": np.asarray(result.corrupted_metric, dtype=np.float64),
        "elapsed_s": np.asarray(result.elapsed_s, dtype=np.float64),
    }
    for dim in result.dims:
        labels = dim_labels(result, dim)
        arrays[f"labels_{dim}"] = np.array(labels, dtype=str) if labels else np.zeros(0, dtype="<U1")
    per_pair = is_dataset_result(result)
    for name, arr in result.extras.items():  # a kind's further arrays (sem, values_per_pair, p_value, ...)
        arr = np.asarray(arr)
        # over a dataset, clean_metric / corrupted_metric are per pair [pair] (contract 6.1)
        replaces = per_pair and name in ("clean_metric", "corrupted_metric")
        if (name not in arrays or replaces) and name != "traceback" and not arr.dtype.hasobject:
            arrays[name] = arr
    return arrays


def is_dataset_result(result: AnalysisResult) -> bool:
    """A result over a dataset of pairs: it carries values_per_pair [pair, ...dims]."""
    v = result.extras.get("values_per_pair")
    return v is not None and np.ndim(v) == np.ndim(result.values) + 1


def _check_target(path: Path) -> None:
    if path.suffix == "" and path.is_dir():
        raise ProjectFileError(f"{path} is a folder; give a file name to export to.")


def export_npz(result: AnalysisResult, path: str | os.PathLike) -> Path:
    """Write `path` (exactly as named) as an uncompressed .npz; raises ProjectFileError if it cannot."""
    path = Path(path)
    _check_target(path)
    arrays = npz_arrays(result)
    return atomic_write(path, lambda f: np.savez(f, allow_pickle=False, **arrays), what="export")


def _fmt(x) -> str:
    x = float(x)
    return "nan" if np.isnan(x) else repr(x)


def csv_text(result: AnalysisResult) -> str:
    """Header `<dim>,<dim>_label,...,value`; one row per cell in C order; cells not computed read "nan".

    A result over a dataset has a first column `pair` and a last column `sem`: the rows of the mean (pair
    "mean", with its standard error), then every pair's own rows (pair 0, 1, ...; sem empty)."""
    labels = [dim_labels(result, d) for d in result.dims]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    dataset = is_dataset_result(result)
    head = [c for d in result.dims for c in (d, f"{d}_label")] + ["value"]
    w.writerow(["pair"] + head + ["sem"] if dataset else head)
    values = np.asarray(result.values)

    def cells(vals, first=(), sem=None):
        for idx in itertools.product(*(range(n) for n in vals.shape)):
            row = list(first)
            for axis, i in enumerate(idx):
                row += [i, labels[axis][i]]
            row.append(_fmt(vals[idx]))
            if dataset:
                row.append(_fmt(sem[idx]) if sem is not None else "")
            w.writerow(row)
    if not dataset:
        cells(values)
        return out.getvalue()
    sem = np.asarray(result.extras.get("sem", np.full(values.shape, np.nan)))
    cells(values, ["mean"], sem)
    for p, vals in enumerate(np.asarray(result.extras["values_per_pair"])):
        cells(vals, [p])
    return out.getvalue()


def export_csv(result: AnalysisResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    _check_target(path)
    data = csv_text(result).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what="export")
