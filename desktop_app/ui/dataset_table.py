"""The Prompts dock's dataset of pairs: the `datasetTable` (clean, corrupted, answer, wrong answer, flag), its
buttons (add, remove, import CSV / JSONL, templates) and the controller that turns edits into undoable
`project.dataset_edit` commands. Files are read and pairs are tokenised in the runner, off the UI thread.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from PySide6.QtCore import Qt, QTimer
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QPushButton, QTableWidget,
                               QTableWidgetItem, QVBoxLayout, QWidget)

from desktop_app.project import dataset_edit
from desktop_app.project.dataset_edit import FIELDS

FLAG_COLUMN = len(FIELDS)
HEADERS = ("clean", "corrupted", "answer", "wrong answer", "flag")
FLAG_DEBOUNCE_MS = 200


@dataclass
class PairCheck:
    """What the runner found about one pair: its tokens and the problems (empty when the pair is usable)."""
    tokens: dict  # field -> list of token strings (answers: one list per spelling, joined)
    problems: list


def check_pairs_job(pairs, prepend_bos=None):
    """A runner job: each pair's tokens and problems (answers that are not one token; prompts whose lengths
    differ while the pairs name no positions to align them)."""
    pairs = list(pairs)
    named = bool(pairs) and all(p.spans for p in pairs)

    def job(state, cancel):
        lm = state.lm
        if lm is None:
            return None
        out = []
        for i, pair in enumerate(pairs):
            if i % 64 == 0:
                cancel.check()
            tokens, problems = {}, []
            for field in ("clean", "corrupted"):
                text = getattr(pair, field)
                try:
                    tokens[field] = lm.tokenize(text, prepend_bos, what=f"{field} prompt").display if text else []
                except Exception as err:  # noqa: BLE001 - shown in the flag column
                    tokens[field] = []
                    problems.append(str(err).rstrip("."))
            if not pair.clean:
                problems.append("the clean prompt is empty")
            clean, corrupted = tokens["clean"], tokens["corrupted"]
            if not named and clean and corrupted and len(clean) != len(corrupted):
                problems.append(f"the clean prompt is {len(clean)} tokens and the corrupted prompt {len(corrupted)}, "
                                "and no position names align them")
            for field, label, spellings in (("answer", "answer", pair.answers()),
                                            ("wrong_answer", "wrong answer", pair.wrongs())):
                shown = []
                for text in spellings:
                    if not text:
                        continue
                    pieces = lm.token_pieces(text).display
                    shown.append(pieces)
                    if len(pieces) != 1:
                        problems.append(f"the {label} {text!r} is {len(pieces)} tokens ({' | '.join(pieces)}); "
                                        "it must be one")
                tokens[field] = shown
            if not pair.answers() or not pair.answers()[0]:
                problems.append("the answer is empty")
            out.append(PairCheck(tokens, problems))
        return out
    return job


def read_file_job(path: str):
    """A runner job reading a CSV / JSONL file of pairs with the engine's reader (errors are one sentence)."""
    def job(state, cancel):
        from desktop_app.engine.datasets import read_pair_file

        return read_pair_file(path)
    return job


def _tooltip(check: PairCheck) -> str:
    lines = [f"{name}: {' | '.join(t)}" for name, t in (("clean", check.tokens.get("clean", [])),
                                                         ("corrupted", check.tokens.get("corrupted", [])))]
    for field, label in (("answer", "answer"), ("wrong_answer", "wrong answer")):
        for pieces in check.tokens.get(field, []):
            lines.append(f"{label}: {' | '.join(pieces)}")
    return "\n".join(check.problems + [""] + lines if check.problems else lines)


class DatasetPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.table = QTableWidget(0, len(HEADERS))
        self.table.setObjectName("datasetTable")
        self.table.setToolTip("The dataset of prompt pairs; double-click a cell to edit it. An answer with several "
                              "spellings is a JSON list, e.g. [\" Mary\", \" mary\"]")
        self.table.setHorizontalHeaderLabels(list(HEADERS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        header = self.table.horizontalHeader()
        for col in range(len(HEADERS)):
            header.setSectionResizeMode(col, QHeaderView.Stretch if col < 2 else QHeaderView.Interactive)
        self.table.verticalHeader().setDefaultSectionSize(20)
        self.add_button = self._button("addPairButton", "Add", "Add an empty pair at the end")
        self.remove_button = self._button("removePairButton", "Remove", "Remove the selected pairs")
        self.import_button = self._button("importDatasetButton", "Import…", "Read pairs from a CSV or JSONL file")
        self.template_button = self._button("templateButton", "Templates…",
                                            "Generate pairs from a template family (IOI, greater-than, facts)")
        buttons = QHBoxLayout()
        for b in (self.add_button, self.remove_button, self.import_button, self.template_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 2, 4, 2)
        lay.addLayout(buttons)
        lay.addWidget(self.table, 1)

    def _button(self, name, text, tip):
        b = QPushButton(text)
        b.setObjectName(name)
        b.setToolTip(tip)
        return b


class DatasetController:
    """Dependencies: the session, the DatasetPanel, `submit` of the runner, `is_loaded()`, `messages`
    (show_error, clear) and `open_templates()` (the template dialog)."""

    def __init__(self, session, panel: DatasetPanel, submit: Callable, is_loaded: Callable[[], bool], messages,
                 open_templates: Callable[[], None], dialog_parent=None):
        self.session, self.panel, self.submit, self.is_loaded = session, panel, submit, is_loaded
        self.messages, self.dialog_parent = messages, dialog_parent
        self.checks: list[PairCheck] | None = None
        self._filling = False
        self.timer = QTimer(panel)
        self.timer.setSingleShot(True)
        self.timer.setInterval(FLAG_DEBOUNCE_MS)
        self.timer.timeout.connect(self.request_checks)
        panel.table.itemChanged.connect(self._item_changed)
        panel.add_button.clicked.connect(lambda: self.session.push(dataset_edit.add_pair(self.session.project)))
        panel.remove_button.clicked.connect(self.remove_selected)
        panel.import_button.clicked.connect(self.import_dialog)
        panel.template_button.clicked.connect(open_templates)
        self.refresh()

    # ---- document -> table
    def refresh(self):
        """Show the project's pairs (after any change of the prompts, undo and redo included)."""
        pairs = dataset_edit.pairs_of(self.session.project.prompts)
        t = self.panel.table
        self._filling = True
        try:
            t.setRowCount(len(pairs))
            t.setVerticalHeaderLabels([str(i) for i in range(len(pairs))])  # pair i, as the pair picker names it
            for row, pair in enumerate(pairs):
                for col, field in enumerate(FIELDS):
                    value = getattr(pair, field)
                    text = dataset_edit.answer_text(value) if field in ("answer", "wrong_answer") else value
                    item = t.item(row, col)
                    if item is None:
                        t.setItem(row, col, QTableWidgetItem(text))
                    elif item.text() != text:
                        item.setText(text)
                flag = QTableWidgetItem("…" if self.is_loaded() else "")
                flag.setFlags(Qt.ItemIsSelectable | Qt.ItemIsEnabled)
                flag.setToolTip("load a model to check the tokens" if not self.is_loaded() else "checking…")
                t.setItem(row, FLAG_COLUMN, flag)
        finally:
            self._filling = False
        self.checks = None
        self.timer.start()

    # ---- table -> document
    def _item_changed(self, item: QTableWidgetItem):
        if self._filling or item.column() >= FLAG_COLUMN:
            return
        field = FIELDS[item.column()]
        pairs = dataset_edit.pairs_of(self.session.project.prompts)
        if item.row() >= len(pairs):
            return
        current = getattr(pairs[item.row()], field)
        if field in ("answer", "wrong_answer"):
            current = dataset_edit.answer_text(current)
        if item.text() != current:
            self.session.push(dataset_edit.edit_cell(self.session.project, item.row(), field, item.text()))

    def remove_selected(self):
        rows = sorted({i.row() for i in self.panel.table.selectedIndexes()})
        if not rows:
            self.messages.show_error("select the pairs to remove first (click a row number).")
            return
        self.session.push(dataset_edit.remove_pairs(self.session.project, rows))

    def import_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self.dialog_parent, "Import pairs", str(Path.home()),
                                              "Pairs (*.csv *.jsonl);;All files (*)")
        if path:
            self.import_file(path)

    def import_file(self, path):
        self.messages.clear()
        self.submit(read_file_job(str(path)), "dataset_import",
                    finished=lambda data: self.session.push(dataset_edit.replace_all(
                        self.session.project, list(data.pairs), f"Import {Path(path).name}", str(path))),
                    errored=lambda message, details="": self.messages.show_error(message, details))

    # ---- flags
    def request_checks(self):
        if not self.is_loaded():
            return
        prompts = self.session.project.prompts
        pairs = dataset_edit.pairs_of(prompts)
        if pairs:
            self.submit(check_pairs_job(pairs, prompts.prepend_bos), "dataset_check",
                        finished=lambda checks, n=len(pairs): self._show_checks(checks, n))

    def _show_checks(self, checks, n_rows):
        t = self.panel.table
        if checks is None or len(checks) != t.rowCount() or n_rows != t.rowCount():
            return
        self.checks = checks
        self._filling = True
        try:
            for row, check in enumerate(checks):
                item = t.item(row, FLAG_COLUMN)
                item.setText("⚠ " + check.problems[0] if check.problems else "ok")
                item.setToolTip(_tooltip(check))
                item.setForeground(Qt.red if check.problems else Qt.darkGreen)
        finally:
            self._filling = False
