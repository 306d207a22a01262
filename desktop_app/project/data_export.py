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
    for name, arr in result.extras.items():  # a kind's further arrays (sem, values_per_pair, p_value, ...)
        arr = np.asarray(arr)
        if name not in arrays and name != "traceback" and not arr.dtype.hasobject:
            arrays[name] = arr
    return arrays


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
    """Header `<dim>,<dim>_label,...,value`; one row per cell in C order; cells not computed read "nan"."""
    labels = [dim_labels(result, d) for d in result.dims]
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow([c for d in result.dims for c in (d, f"{d}_label")] + ["value"])
    values = np.asarray(result.values)
    for idx in itertools.product(*(range(n) for n in values.shape)):
        row = []
        for axis, i in enumerate(idx):
            row += [i, labels[axis][i]]
        w.writerow(row + [_fmt(values[idx])])
    return out.getvalue()


def export_csv(result: AnalysisResult, path: str | os.PathLike) -> Path:
    path = Path(path)
    _check_target(path)
    data = csv_text(result).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data), what="export")
