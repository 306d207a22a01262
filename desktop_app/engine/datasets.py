"""Datasets of prompt pairs (contract 6.1): a list of pairs, or a CSV / JSONL file read as a stream.

A file is read line by line as bytes, each line decoded on its own (so a non-UTF-8 line is reported with its
number), and parsed as it arrives: `scan_pair_file` checks a whole file holding only an 8-byte digest per pair
(for duplicates), `read_pair_file` keeps the pairs. Every bad input gets one sentence naming the line.

`tokenize_dataset` checks the pairs against a model: answers that are not single tokens (the tokens shown),
pairs whose prompts differ in length when no position names align them (both tokenisations shown), and maps
each named position (IO, S1, S2, END ...) to its token index in both prompts.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import Progress

COLUMNS = ("clean", "corrupted", "answer", "wrong_answer")
END = "END"  # the last token of each prompt, always available as a position name


@dataclass(frozen=True, slots=True)
class PairText:
    """One pair as text. `answer` / `wrong_answer` are a token or a tuple of tokens (several spellings).
    `spans` names positions: {name: ((start, end) in clean, (start, end) in corrupted)}, character offsets."""
    clean: str
    corrupted: str
    answer: str | tuple[str, ...]
    wrong_answer: str | tuple[str, ...] = ""
    spans: tuple = ()  # ((name, (cs, ce), (ks, ke)), ...), hashable

    def answers(self) -> tuple[str, ...]:
        return self.answer if isinstance(self.answer, tuple) else (self.answer,)

    def wrongs(self) -> tuple[str, ...]:
        w = self.wrong_answer
        return w if isinstance(w, tuple) else ((w,) if w else ())

    def position_names(self) -> list[str]:
        return [name for name, _, _ in self.spans]

    def to_dict(self) -> dict:
        d = {"clean": self.clean, "corrupted": self.corrupted,
             "answer": list(self.answer) if isinstance(self.answer, tuple) else self.answer,
             "wrong_answer": list(self.wrong_answer) if isinstance(self.wrong_answer, tuple) else self.wrong_answer}
        if self.spans:
            d["positions"] = {name: [list(c), list(k)] for name, c, k in self.spans}
        return d


def _answer_field(value, where: str, name: str):
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise SpecError(f"{where}: field '{name}' must be a token or a non-empty list of tokens.")
        return tuple(value) if len(value) > 1 else value[0]
    if not isinstance(value, str):
        raise SpecError(f"{where}: field '{name}' must be a text string or a list of them, not {value!r}.")
    return value


def _spans(value, where: str) -> tuple:
    if value in (None, {}):
        return ()
    try:
        return tuple((str(name), (int(c[0]), int(c[1])), (int(k[0]), int(k[1]))) for name, (c, k) in value.items())
    except (AttributeError, TypeError, ValueError, IndexError):
        raise SpecError(f"{where}: field 'positions' must map each name to [[start, end], [start, end]] "
                        "(character offsets in the clean and the corrupted prompt).") from None


def pair_from_dict(d, where: str) -> PairText:
    if not isinstance(d, dict):
        raise SpecError(f"{where} must be an object with {', '.join(COLUMNS)}.")
    for col in ("clean", "corrupted", "answer"):
        if col not in d:
            raise SpecError(f"{where} has no field '{col}'; every pair needs {', '.join(COLUMNS)}.")
    unknown = sorted(set(d) - set(COLUMNS) - {"positions"})
    if unknown:
        raise SpecError(f"{where} has an unknown field '{unknown[0]}'; known fields are "
                        f"{', '.join(COLUMNS)}, positions.")
    for col in ("clean", "corrupted"):
        if not isinstance(d[col], str) or not d[col].strip():
            raise SpecError(f"{where}: field '{col}' is empty; write the {col} prompt.")
    answer = _answer_field(d["answer"], where, "answer")
    if not answer:
        raise SpecError(f"{where}: field 'answer' is empty; give the token the clean prompt should predict.")
    wrong = _answer_field(d.get("wrong_answer", ""), where, "wrong_answer")
    return PairText(d["clean"], d["corrupted"], answer, wrong, _spans(d.get("positions"), where))


def _decoded_lines(path: Path, read: list | None = None) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one at a time; read[0] counts the bytes read so far."""
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if read is not None:
                read[0] += len(raw)
            try:
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise SpecError(f"{path.name} line {number} is not UTF-8 text (byte {err.start + 1} of the line); "
                                "save the file as UTF-8.") from None


def parse_answer_cell(text: str):
    """A CSV cell: one token, or a JSON list of tokens (["·Mary", "·mary"] written as ["\u0020Mary", ...])."""
    stripped = text.strip()
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError:
            return text
        if isinstance(value, list):
            return value
    return text


def _csv_pairs(path: Path, read: list | None = None) -> Iterator[tuple[int, PairText]]:
    lines = _decoded_lines(path, read)
    numbers: list[int] = []

    def text_lines():
        for number, text in lines:
            numbers.append(number)
            yield text
    def rows():
        reader = csv.reader(text_lines())
        while True:
            try:
                yield next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a field over the csv module's size limit
                raise SpecError(f"{path.name} line {numbers[-1] if numbers else 1} cannot be read as CSV ({err}); "
                                "fix that row.") from None
    reader = rows()
    try:
        header = next(reader)
    except StopIteration:
        raise SpecError(f"{path.name} is empty; it needs the header {','.join(COLUMNS)} and one pair per row.") from None
    header = [h.strip() for h in header]
    for col in COLUMNS:
        if col not in header:
            raise SpecError(f"{path.name} has no column '{col}'; the header must be {','.join(COLUMNS)}.")
    where = {col: header.index(col) for col in COLUMNS}
    blank_at = None
    for row in reader:
        number = numbers[-1]
        if not row or all(not c.strip() for c in row):
            blank_at = blank_at or number
            continue
        if blank_at is not None:
            raise SpecError(f"{path.name} line {blank_at} is an empty row; remove it.")
        if len(row) != len(header):
            raise SpecError(f"{path.name} line {number} has {len(row)} fields but the header has {len(header)}; "
                            "quote fields that contain commas.")
        cells = {col: row[i] for col, i in where.items()}
        for col in COLUMNS:
            if not cells[col].strip():
                raise SpecError(f"{path.name} line {number}: the '{col}' field is empty; fill it in or remove the row.")
        d = {col: (parse_answer_cell(cells[col]) if col in ("answer", "wrong_answer") else cells[col]) for col in COLUMNS}
        yield number, pair_from_dict(d, f"{path.name} line {number}")


def _jsonl_pairs(path: Path, read: list | None = None) -> Iterator[tuple[int, PairText]]:
    blank_at = None
    for number, text in _decoded_lines(path, read):
        if not text.strip():
            blank_at = blank_at or number
            continue
        if blank_at is not None:
            raise SpecError(f"{path.name} line {blank_at} is an empty row; remove it.")
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path.name} line {number} is not valid JSON ({e.msg} at column {e.colno}); fix it.") \
                from None
        where = f"{path.name} line {number}"
        if isinstance(d, dict):
            for col in COLUMNS:
                if col not in d:
                    raise SpecError(f"{where} has no field '{col}'; every pair needs {', '.join(COLUMNS)}.")
        yield number, pair_from_dict(d, where)


def iter_pair_file(path, read: list | None = None) -> Iterator[tuple[int, PairText]]:
    """(line number, pair) of a .csv or .jsonl file, one at a time (read[0] counts the bytes read)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"dataset file {path} does not exist or is not a file; check the path.")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _csv_pairs(path, read)
    if suffix in (".jsonl", ".ndjson"):
        return _jsonl_pairs(path, read)
    raise SpecError(f"dataset file {path.name} must end in .csv or .jsonl.")


def _digest(pair: PairText) -> bytes:
    key = json.dumps([pair.clean, pair.corrupted, pair.answer, pair.wrong_answer], ensure_ascii=False)
    return hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()


class _Duplicates:
    def __init__(self, name: str):
        self.name = name
        self.first_line: dict[bytes, int] = {}

    def check(self, number: int, pair: PairText) -> None:
        key = _digest(pair)
        first = self.first_line.setdefault(key, number)
        if first != number:
            raise SpecError(f"{self.name} lines {first} and {number} hold the same pair; remove one.")


def _checked_pairs(path: Path, every: int, cancel, kept: list | None):
    """A job reading a .csv / .jsonl file as it streams in, checking every pair (duplicates by an 8-byte digest
    per pair) and appending it to `kept` if given: yields Progress (bytes read of the file's size) every `every`
    pairs, checks `cancel` there, returns the number of pairs."""
    pairs = iter_pair_file(path, read := [0])
    total = max(1, os.path.getsize(path))
    dup = _Duplicates(path.name)
    count = 0
    for number, pair in pairs:
        dup.check(number, pair)
        if kept is not None:
            kept.append(pair)
        count += 1
        if count % every == 0:
            if cancel is not None:
                cancel.check()
            yield Progress(min(total, read[0]), total, f"reading {path.name}: {count} pairs")
    if count == 0:
        raise SpecError(f"{path.name} holds no pairs; add one pair per row under the header.")
    yield Progress(total, total, f"read {path.name}: {count} pairs")
    return count


def scan_pair_file(path, every: int = 10_000, cancel=None):
    """A job checking a whole file without keeping its pairs: yields Progress (bytes read), returns the number of
    pairs. Memory: one 8-byte digest and a line number per pair (duplicate detection)."""
    return (yield from _checked_pairs(Path(path), every, cancel, None))


@dataclass
class PairDataset:
    pairs: list[PairText]
    source: str = ""  # the file it came from, if any

    def __len__(self) -> int:
        return len(self.pairs)

    def position_names(self) -> list[str]:
        """The names every pair gives (in the first pair's order), END included; [] when none are named."""
        if not self.pairs or not self.pairs[0].spans:
            return []
        names = self.pairs[0].position_names()
        for i, p in enumerate(self.pairs):
            if p.position_names() != names:
                raise SpecError(f"pair {i} names the positions {p.position_names()} but pair 0 names {names}; "
                                "every pair must name the same positions.")
        return names + ([END] if END not in names else [])


def dataset_from_list(items, where: str = "prompts") -> PairDataset:
    if not isinstance(items, list) or not items:
        raise SpecError(f"{where} must be a non-empty list of pairs.")
    pairs = [pair_from_dict(d, f"{where}[{i}]") for i, d in enumerate(items)]
    dup = _Duplicates(where)
    for i, p in enumerate(pairs):
        try:
            dup.check(i, p)
        except SpecError:
            raise SpecError(f"{where}[{dup.first_line[_digest(p)]}] and {where}[{i}] are the same pair; "
                            "remove one.") from None
    return PairDataset(pairs)


def read_pair_file_job(path, every: int = 5_000, cancel=None):
    """A job reading a .csv / .jsonl file of pairs as it streams in: yields Progress (bytes read of the file's
    size) every `every` pairs, checks `cancel` there, returns the PairDataset. The pairs are held once (the list
    it returns); duplicates are found by an 8-byte digest per pair."""
    path, pairs = Path(path), []
    yield from _checked_pairs(path, every, cancel, pairs)
    return PairDataset(pairs, source=str(path))


def read_pair_file(path, progress=None) -> PairDataset:
    """The pairs of a .csv / .jsonl file; `progress(event)`, if given, receives read_pair_file_job's Progress."""
    job = read_pair_file_job(path)
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if progress is not None:
            progress(event)


def write_pair_file(dataset: PairDataset, path) -> Path:
    """CSV (the four columns; answer lists as JSON lists) or JSONL (named positions kept)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8", newline="") as fh:
        if path.suffix.lower() == ".csv":
            w = csv.writer(fh)
            w.writerow(COLUMNS)
            for p in dataset.pairs:
                w.writerow([p.clean, p.corrupted, *(json.dumps(list(a), ensure_ascii=False) if isinstance(a, tuple)
                                                    else a for a in (p.answer, p.wrong_answer))])
        else:
            for p in dataset.pairs:
                fh.write(json.dumps(p.to_dict(), ensure_ascii=False) + "\n")
    return path


# ---- against a model ---------------------------------------------------------------------------------------

@dataclass
class TokenizedPair:
    clean: object  # TokenInfo
    corrupted: object
    answer_ids: tuple[int, ...]
    wrong_ids: tuple[int, ...]
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (clean index, corrupted index)
    span_texts: dict[str, str] = field(default_factory=dict)  # name -> the named text in the clean prompt

    @property
    def same_length(self) -> bool:
        return len(self.clean.ids) == len(self.corrupted.ids)


@dataclass
class TokenizedDataset:
    pairs: list[TokenizedPair]
    position_names: list[str]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def aligned(self) -> bool:
        """Every prompt of every pair has the same token length (positions line up by index)."""
        n = len(self.pairs[0].clean.ids)
        return all(len(p.clean.ids) == n and len(p.corrupted.ids) == n for p in self.pairs)


def _char_offsets(tokens, text: str) -> list[tuple[int, int]] | None:
    """(start, end) in `text` of each token, or None when the token strings do not spell the text."""
    out, at = [], 0
    for i, s in enumerate(tokens.strings):
        if i == 0 and tokens.bos:
            out.append((0, 0))
            continue
        out.append((at, at + len(s)))
        at += len(s)
    spelled = "".join(s for i, s in enumerate(tokens.strings) if not (i == 0 and tokens.bos))
    if spelled != text and spelled.lstrip(" ") != text:
        return None
    shift = len(spelled) - len(text) if spelled != text else 0
    return [(max(0, a - shift), max(0, b - shift)) for a, b in out]


def token_index_of_span(tokens, text: str, span: tuple[int, int], where: str) -> int:
    """The last token overlapping the character span (a multi-token name is read at its last token)."""
    offsets = _char_offsets(tokens, text)
    if offsets is None:
        raise PromptError(f"{where}: the tokens do not spell the prompt, so named positions cannot be placed; "
                          f"tokens: {' | '.join(tokens.display)}")
    start, end = span
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        raise PromptError(f"{where}: the characters {start}-{end} of the prompt fall on no token.")
    return hits[-1]


def _answer_ids(lm, texts, where: str, what: str) -> tuple[int, ...]:
    ids = []
    for t in texts:
        pieces = lm.token_pieces(t)
        if len(pieces.ids) != 1:
            raise PromptError(f"{where}: the {what} {t!r} is {len(pieces.ids)} tokens ({' | '.join(pieces.display)}), "
                              "not one; use single tokens of the vocabulary (often with a leading space).")
        ids.append(pieces.ids[0])
    return tuple(ids)


def tokenize_pair(lm, pair: PairText, index: int, prepend_bos=None, need_wrong: bool = True,
                  names: list[str] | None = None) -> TokenizedPair:
    where = f"pair {index}"
    clean = lm.tokenize(pair.clean, prepend_bos, what=f"clean prompt of {where}")
    corrupted = lm.tokenize(pair.corrupted, prepend_bos, what=f"corrupted prompt of {where}")
    answer = _answer_ids(lm, pair.answers(), where, "answer")
    wrongs = pair.wrongs()
    if need_wrong and not wrongs:
        raise PromptError(f"{where} has no wrong answer; this metric needs one.")
    wrong = _answer_ids(lm, wrongs, where, "wrong answer")
    if need_wrong and set(answer) & set(wrong):
        raise PromptError(f"{where}: the answer and the wrong answer share a token; choose different tokens.")
    positions = {}
    if names:
        for name, cspan, kspan in pair.spans:
            positions[name] = (token_index_of_span(clean, pair.clean, cspan, f"{where} clean prompt ({name})"),
                               token_index_of_span(corrupted, pair.corrupted, kspan,
                                                   f"{where} corrupted prompt ({name})"))
        positions[END] = (len(clean.ids) - 1, len(corrupted.ids) - 1)
    elif len(clean.ids) != len(corrupted.ids):
        raise PromptError(
            f"{where}: the clean prompt is {len(clean.ids)} tokens and the corrupted prompt {len(corrupted.ids)}, and "
            f"no position names align them; make them the same length or use a template with named positions. "
            f"clean: {' | '.join(clean.display)}  corrupted: {' | '.join(corrupted.display)}")
    texts = {name: pair.clean[c[0]:c[1]] for name, c, _ in pair.spans}
    return TokenizedPair(clean, corrupted, answer, wrong, positions, texts)


def tokenize_dataset(lm, dataset: PairDataset, prepend_bos=None, need_wrong: bool = True) -> TokenizedDataset:
    names = dataset.position_names()
    pairs = [tokenize_pair(lm, p, i, prepend_bos, need_wrong, names) for i, p in enumerate(dataset.pairs)]
    return TokenizedDataset(pairs, names)
