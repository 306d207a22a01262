"""A local text corpus for SAE training and feature dashboards: reading it and cutting it into token batches.

    texts = read_corpus("notes.txt")          # .txt: paragraphs (blank-line separated), else lines; .jsonl: "text"
    docs = tokenize_documents(lm, texts, context=128)
    for doc_index, ids, lengths in padded_batches(docs, batch_size=32, pad_id=0): ...

Batches are right-padded without an attention mask: in a causal model a real token never attends to a later
one, so padding after it cannot change its activations; callers ignore positions >= length.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from desktop_app.engine.errors import SAEError

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_corpus(path: str | os.PathLike, max_texts: int | None = None) -> list[str]:
    """The documents of a corpus file; raises SAEError (one sentence) for a missing, unreadable or empty file."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise SAEError(f"Corpus {p} does not exist or is not a file; choose a .txt or .jsonl file of text.")
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise SAEError(f"Corpus {p} is neither a .txt nor a .jsonl file; use plain text (paragraphs or lines) "
                       "or JSON lines with a \"text\" field.")
    try:
        raw = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SAEError(f"Cannot read corpus {p} ({exc.__class__.__name__}); save it as UTF-8 text and try again.",
                       details=str(exc)) from exc
    texts = _jsonl_texts(raw, p) if suffix in JSONL_SUFFIXES else _plain_texts(raw)
    if not texts:
        raise SAEError(f"Corpus {p} contains no text; add some paragraphs or lines to it.")
    return texts[:max_texts] if max_texts else texts


def _plain_texts(raw: str) -> list[str]:
    raw = raw.replace("\r\n", "\n")
    paragraphs = [b.strip() for b in raw.split("\n\n")]
    paragraphs = [b for b in paragraphs if b]
    if len(paragraphs) > 1:
        return paragraphs
    return [line.strip() for line in raw.split("\n") if line.strip()]


def _jsonl_texts(raw: str, where: Path) -> list[str]:
    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SAEError(f"Line {number} of corpus {where} is not valid JSON; make every line an object like "
                           "{\"text\": \"...\"}.", details=str(exc)) from exc
        text = obj.get("text") if isinstance(obj, dict) else None
        if not isinstance(text, str):
            raise SAEError(f"Line {number} of corpus {where} has no string field \"text\"; give every line one.")
        if text.strip():
            texts.append(text)
    return texts


def tokenize_documents(lm, texts: list[str], context: int = 128, max_tokens: int | None = None) -> list[list[int]]:
    """Token ids per document, using the model's own tokenizer defaults (special tokens included); documents
    longer than `context` (or the model's context) are cut into consecutive pieces. Stops after max_tokens."""
    context = max(2, min(int(context), int(lm.info.n_ctx)))
    docs: list[list[int]] = []
    total = 0
    for text in texts:
        ids = list(lm.tokenizer(text, add_special_tokens=True)["input_ids"])
        for start in range(0, len(ids), context):
            piece = ids[start:start + context]
            if max_tokens is not None and total + len(piece) > max_tokens:
                piece = piece[:max_tokens - total]
            if piece:
                docs.append(piece)
                total += len(piece)
            if max_tokens is not None and total >= max_tokens:
                return docs
    return docs


def padded_batches(docs: list[list[int]], batch_size: int, pad_id: int = 0):
    """Yields (document indices, ids [B, L] long tensor, lengths [B]) in document order; the documents of a
    batch are right-padded with pad_id to the longest of them."""
    import torch

    batch_size = max(1, int(batch_size))
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        width = max(len(d) for d in chunk)
        ids = torch.full((len(chunk), width), int(pad_id), dtype=torch.long)
        for row, doc in enumerate(chunk):
            ids[row, :len(doc)] = torch.tensor(doc, dtype=torch.long)
        lengths = torch.tensor([len(d) for d in chunk], dtype=torch.long)
        yield list(range(start, start + len(chunk))), ids, lengths


def special_ids(lm) -> set[int]:
    """Ids of the tokenizer's special tokens (BOS / EOS ...), whose activations are outliers."""
    return {int(i) for i in (getattr(lm.tokenizer, "all_special_ids", None) or [])}
