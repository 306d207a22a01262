"""Undoable edits of the project's dataset of prompt pairs (the window's `datasetTable`). Torch-free, Qt-free.

The project's prompts are one pair (`specs.Prompts`) or a dataset (`dataset_prompts.DatasetPrompts`). The
table shows both as a list of pairs; an edit builds the new prompts and `SetPairs` swaps them in, so one undo
reverts one cell edit, one added or removed row, one import or one generated dataset.
"""
from __future__ import annotations

import json
from dataclasses import replace

from desktop_app.engine.datasets import PairText, parse_answer_cell
from desktop_app.project.dataset_prompts import DatasetPrompts, is_dataset
from desktop_app.project.specs import Prompts
from desktop_app.project.undo import Command

FIELDS = ("clean", "corrupted", "answer", "wrong_answer")


def pairs_of(prompts) -> list[PairText]:
    """The pairs the table shows: a dataset's pairs, or the single pair (none while its clean prompt is empty)."""
    if is_dataset(prompts):
        return list(prompts.pairs)
    if not prompts.clean and not prompts.corrupted:
        return []
    return [PairText(prompts.clean, prompts.corrupted, prompts.answer, prompts.wrong_answer)]


def prompts_with_pairs(old, pairs: list[PairText], source: str | None = None):
    """New prompts holding `pairs` (the old prompts' prepend_bos kept). No pairs gives an empty single pair."""
    bos = old.prepend_bos
    if not pairs:
        return Prompts(clean="", prepend_bos=bos)
    keep_source = old.source if is_dataset(old) else ""
    return DatasetPrompts(tuple(pairs), source=keep_source if source is None else source, prepend_bos=bos)


def answer_text(value) -> str:
    """A cell's text for an answer: the token, or a JSON list of its spellings (as a CSV file writes it)."""
    return json.dumps(list(value)) if isinstance(value, tuple) else value


def answer_value(text: str):
    """The inverse of answer_text: a JSON list of two or more tokens becomes a tuple."""
    value = parse_answer_cell(text)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value) if len(value) > 1 else value[0]
    return text


def pair_with_field(pair: PairText, field: str, text: str) -> PairText:
    """The pair with one field changed; named positions stay only while the text at each is unchanged."""
    if field in ("answer", "wrong_answer"):
        return replace(pair, **{field: answer_value(text)})
    return DatasetPrompts((pair,)).with_field(field, text).pairs[0]


class SetPairs(Command):
    """Replace the project's prompts by ones holding other pairs (an edit, add, remove, import or template)."""

    def __init__(self, project, pairs: list[PairText], text: str, source: str | None = None):
        self.old = project.prompts
        self.new = prompts_with_pairs(self.old, list(pairs), source)
        self.text = text

    def redo(self, project):
        project.set_prompts(self.new)

    def undo(self, project):
        project.set_prompts(self.old)


def edit_cell(project, row: int, field: str, text: str) -> SetPairs:
    pairs = pairs_of(project.prompts)
    pairs[row] = pair_with_field(pairs[row], field, text)
    return SetPairs(project, pairs, f"Edit {field.replace('_', ' ')} of pair {row}")


def add_pair(project) -> SetPairs:
    pairs = pairs_of(project.prompts) + [PairText("", "", "", "")]
    return SetPairs(project, pairs, "Add a pair")


def remove_pairs(project, rows) -> SetPairs:
    drop = set(rows)
    pairs = [p for i, p in enumerate(pairs_of(project.prompts)) if i not in drop]
    return SetPairs(project, pairs, f"Remove {len(drop)} pair{'s' if len(drop) != 1 else ''}")


def replace_all(project, pairs: list[PairText], text: str, source: str = "") -> SetPairs:
    return SetPairs(project, pairs, text, source)
