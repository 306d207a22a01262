"""Text inputs of the concept analyses: labelled datasets (`text,label`), text lists and contrastive pairs.

    texts, labels = read_labelled_dataset("sentiment.csv")   # CSV with a header, or JSONL objects
    texts = read_texts(["a", "b"]) / read_texts("concept.txt")  # a list, or a .txt (one text a line) / .jsonl
    pos, neg = read_pairs("pairs.csv")                          # columns positive,negative

Errors are SpecError with one sentence naming the file and what to fix.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from desktop_app.engine.errors import SpecError

MAX_FILE_BYTES = 256 * 2**20


def _read_text_file(path, what: str) -> tuple[Path, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise SpecError(f"The {what} {p} does not exist or is not a file; choose a .csv, .jsonl or .txt file.")
    if p.stat().st_size > MAX_FILE_BYTES:
        raise SpecError(f"The {what} {p} is larger than {MAX_FILE_BYTES >> 20} MiB; use a smaller file.")
    try:
        return p, p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"Cannot read the {what} {p} ({exc.__class__.__name__}); save it as UTF-8 text.",
                        details=str(exc)) from exc


def _records(path, what: str, columns: tuple[str, ...]) -> list[dict]:
    """Rows of a CSV (header naming `columns`) or JSONL (objects with `columns`) file, as dicts of strings."""
    p, raw = _read_text_file(path, what)
    suffix = p.suffix.lower()
    rows: list[dict] = []
    if suffix in (".jsonl", ".ndjson"):
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(f"Line {number} of the {what} {p} is not valid JSON; make every line an object "
                                f"with the fields {', '.join(columns)}.", details=str(exc)) from exc
            if not isinstance(obj, dict) or any(c not in obj for c in columns):
                raise SpecError(f"Line {number} of the {what} {p} lacks a field of {', '.join(columns)}; "
                                "give every line all of them.")
            rows.append({c: obj[c] for c in columns})
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if suffix == ".tsv" else ",")
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise SpecError(f"The {what} {p} has no column {missing[0]!r} in its header ({', '.join(header) or 'empty'}); "
                            f"the first line must name the columns {', '.join(columns)}.")
        for row in reader:
            row = {(k or "").strip(): v for k, v in row.items()}
            rows.append({c: row[c] for c in columns})
    else:
        raise SpecError(f"The {what} {p} is neither .csv nor .jsonl; use one of them with the columns "
                        f"{', '.join(columns)}.")
    return rows


def read_labelled_dataset(source) -> tuple[list[str], list[str]]:
    """(texts, labels as strings) of a `text,label` file, or of a list of (text, label) pairs / dicts."""
    if isinstance(source, (str, os.PathLike)):
        rows = _records(source, "labelled dataset", ("text", "label"))
        where = f"the dataset {source}"
    else:
        rows = [r if isinstance(r, dict) else {"text": r[0], "label": r[1]} for r in source]
        where = "the dataset"
    texts, labels = [], []
    for number, row in enumerate(rows, start=1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"Row {number} of {where} has an empty text; give every row a text.")
        if label is None or str(label).strip() == "":
            raise SpecError(f"Row {number} of {where} has no label; give every row a label.")
        texts.append(text)
        labels.append(str(label).strip())
    if not texts:
        raise SpecError(f"{where[0].upper() + where[1:]} has no rows; add `text,label` rows.")
    return texts, labels


def read_texts(source, what: str = "text list") -> list[str]:
    """A list of texts: a Python list, or a file path (.txt: one text a line; .jsonl: a "text" field; .csv: a
    "text" column). Raises SpecError for an empty list."""
    if isinstance(source, (str, os.PathLike)):
        p = Path(source).expanduser()
        if p.suffix.lower() in (".txt", ".text"):
            _, raw = _read_text_file(p, what)
            texts = [line.strip() for line in raw.splitlines() if line.strip()]
        else:
            rows = _records(p, what, ("text",))
            bad = next((n for n, r in enumerate(rows, start=1) if not isinstance(r["text"], str)), None)
            if bad is not None:
                raise SpecError(f"Row {bad} of the {what} {p} has no text (a missing cell or a non-string value); "
                                "give every row a text.")
            texts = [r["text"] for r in rows if r["text"].strip()]
        where = f"{what} {p}"
    else:
        texts = [str(t) for t in (source or []) if str(t).strip()]
        where = what
    if not texts:
        raise SpecError(f"The {where} is empty; give at least one text.")
    return texts


def read_pairs(source) -> tuple[list[str], list[str]]:
    """(positives, negatives) of a contrastive pairs file (columns positive,negative) or list of pairs."""
    if isinstance(source, (str, os.PathLike)):
        rows = _records(source, "pairs file", ("positive", "negative"))
    else:
        rows = [r if isinstance(r, dict) else {"positive": r[0], "negative": r[1]} for r in source]
    for number, row in enumerate(rows, start=1):
        for column in ("positive", "negative"):
            if not isinstance(row.get(column), str) or not row[column].strip():
                raise SpecError(f"Row {number} of the pairs file has no {column} text; give every row both texts.")
    pos = [r["positive"] for r in rows]
    neg = [r["negative"] for r in rows]
    if not pos:
        raise SpecError("The pairs file has no rows; add `positive,negative` rows.")
    return pos, neg


TEXT_FILE_SUFFIXES = (".txt", ".text", ".jsonl", ".ndjson", ".csv", ".tsv")


def texts_or_file(entries, what: str = "text list") -> list[str]:
    """A spec's text-list field: its texts, or — when it holds one entry that names an existing .txt / .jsonl /
    .csv file (or is a str path) — the texts of that file."""
    if isinstance(entries, (str, os.PathLike)):
        return read_texts(entries, what)
    entries = list(entries or [])
    if len(entries) == 1:
        p = Path(str(entries[0]).strip()).expanduser()
        if p.suffix.lower() in TEXT_FILE_SUFFIXES and p.is_file():
            return read_texts(p, what)
    return read_texts(entries, what)
