"""The Prompts dock's dataset of pairs: the `datasetTable` (clean, corrupted, answer, wrong answer, flag), its
buttons (add, remove, import CSV / JSONL, templates) and the controller that turns edits into undoable
`project.dataset_edit` commands. Files are read and pairs are tokenised in the runner, off the UI thread.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, QTimer
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QProgressBar,
                               QPushButton, QTableView, QVBoxLayout, QWidget)

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


def check_pairs_job(pairs, prepend_bos=None, named: bool | None = None):
    """A runner job: each pair's tokens and problems (answers that are not one token; prompts whose lengths
    differ while the pairs name no positions to align them). `named`: whether the whole dataset names positions
    (by default: whether all of `pairs` do; give it when `pairs` is only the changed part of a dataset)."""
    pairs = list(pairs)
    if named is None:
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
    """A runner job reading a CSV / JSONL file of pairs with the engine's streaming reader: Progress (bytes of
    the file) as it reads, the PairDataset at the end (errors are one sentence)."""
    def job(state, cancel):
        from desktop_app.engine.datasets import read_pair_file_job

        return read_pair_file_job(path, cancel=cancel)
    return job


def time_left_text(done: int, total: int, elapsed: float, message: str) -> str:
    """'41% · 12.3 MB/s · 3 s left · message' from bytes done of total after `elapsed` seconds."""
    pct = int(100 * done / max(total, 1))
    if done <= 0 or elapsed <= 0:
        return f"{pct}% · {message}"
    rate = done / elapsed
    return f"{pct}% · {rate / 1e6:.1f} MB/s · {max(0.0, (total - done) / rate):.0f} s left · {message}"


def _tooltip(check: PairCheck) -> str:
    lines = [f"{name}: {' | '.join(t)}" for name, t in (("clean", check.tokens.get("clean", [])),
                                                         ("corrupted", check.tokens.get("corrupted", [])))]
    for field, label in (("answer", "answer"), ("wrong_answer", "wrong answer")):
        for pieces in check.tokens.get(field, []):
            lines.append(f"{label}: {' | '.join(pieces)}")
    return "\n".join(check.problems + [""] + lines if check.problems else lines)


def _check_key(pair, named: bool, prepend_bos):
    """What a pair's check depends on besides the loaded model (which clears the cache when it changes)."""
    return (pair, named, prepend_bos)


class PairsModel(QAbstractTableModel):
    """The project's pairs as a table model: a change of the pairs updates only the rows that changed, and an
    edited cell goes to `on_edit(row, field, text)` (the controller turns it into an undoable command)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.pairs: list = []
        self.flags_of: Callable[[int], tuple[str, str, object]] = lambda row: ("", "", None)
        self.on_edit: Callable[[int, str, str], None] = lambda row, field, text: None

    def rowCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(self.pairs)

    def columnCount(self, parent=QModelIndex()):
        return 0 if parent.isValid() else len(HEADERS)

    def headerData(self, section, orientation, role=Qt.DisplayRole):
        if role != Qt.DisplayRole:
            return None
        return HEADERS[section] if orientation == Qt.Horizontal else str(section)  # pair i, as the picker names it

    def cell_text(self, row: int, col: int) -> str:
        if col >= FLAG_COLUMN:
            return self.flags_of(row)[0]
        value = getattr(self.pairs[row], FIELDS[col])
        return dataset_edit.answer_text(value) if FIELDS[col] in ("answer", "wrong_answer") else value

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid() or index.row() >= len(self.pairs):
            return None
        row, col = index.row(), index.column()
        if role in (Qt.DisplayRole, Qt.EditRole):
            return self.cell_text(row, col)
        if col == FLAG_COLUMN and role == Qt.ToolTipRole:
            return self.flags_of(row)[1]
        if col == FLAG_COLUMN and role == Qt.ForegroundRole:
            colour = self.flags_of(row)[2]
            return QBrush(colour) if colour is not None else None
        return None

    def flags(self, index):
        base = Qt.ItemIsSelectable | Qt.ItemIsEnabled
        return base if index.column() >= FLAG_COLUMN else base | Qt.ItemIsEditable

    def setData(self, index, value, role=Qt.EditRole):
        if role != Qt.EditRole or not index.isValid() or index.column() >= FLAG_COLUMN:
            return False
        if str(value) != self.cell_text(index.row(), index.column()):
            self.on_edit(index.row(), FIELDS[index.column()], str(value))
        return True

    def set_pairs(self, pairs: list) -> list[int]:
        """Show `pairs`; returns the rows that changed. Same count: only those rows are repainted; else the
        rows after the first difference are inserted or removed."""
        old = self.pairs
        if len(old) == len(pairs):
            changed = [i for i, (a, b) in enumerate(zip(old, pairs)) if a is not b and a != b]
            self.pairs = list(pairs)
            if changed:
                self.dataChanged.emit(self.index(changed[0], 0), self.index(changed[-1], FLAG_COLUMN))
            return changed
        self.beginResetModel()
        self.pairs = list(pairs)
        self.endResetModel()
        return list(range(len(pairs)))

    def flags_changed(self, rows=None):
        """Repaint the flag column of `rows` (all rows when None)."""
        if self.pairs and (rows is None or rows):
            first, last = (0, len(self.pairs) - 1) if rows is None else (min(rows), max(rows))
            self.dataChanged.emit(self.index(first, FLAG_COLUMN), self.index(last, FLAG_COLUMN))


class DatasetPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.model = PairsModel(self)
        self.table = QTableView()
        self.table.setObjectName("datasetTable")
        self.table.setModel(self.model)
        self.table.setToolTip("The dataset of prompt pairs; double-click a cell to edit it. An answer with several "
                              "spellings is a JSON list, e.g. [\" Mary\", \" mary\"]")
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
        self.progress = QProgressBar()
        self.progress.setObjectName("datasetProgressBar")
        self.progress.setToolTip("Reading the dataset file")
        self.progress_label = QLabel("")
        self.progress_label.setObjectName("datasetProgressLabel")
        reading = QHBoxLayout()
        reading.addWidget(self.progress, 1)
        reading.addWidget(self.progress_label, 2)
        self.progress.hide()
        self.progress_label.hide()
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 2, 4, 2)
        lay.addLayout(buttons)
        lay.addLayout(reading)
        lay.addWidget(self.table, 1)

    def _button(self, name, text, tip):
        b = QPushButton(text)
        b.setObjectName(name)
        b.setToolTip(tip)
        return b


class DatasetController:
    """Dependencies: the session, the DatasetPanel, `submit` of the runner, `is_loaded()`, `messages`
    (show_error, clear) and `open_templates()` (the template dialog). Pair checks are cached per pair for the
    loaded model, so an edit re-tokenises only the pairs it changed."""

    def __init__(self, session, panel: DatasetPanel, submit: Callable, is_loaded: Callable[[], bool], messages,
                 open_templates: Callable[[], None], dialog_parent=None):
        self.session, self.panel, self.submit, self.is_loaded = session, panel, submit, is_loaded
        self.messages, self.dialog_parent = messages, dialog_parent
        self.checks: list[PairCheck] | None = None
        self._cache: dict = {}  # _check_key -> PairCheck, for the loaded model
        self._rows = None  # SimpleNamespace: per row its cache key and check, the rows without a check
        self.checked_last = 0  # how many pairs the last check job tokenised (the rest came from the cache)
        self.timer = QTimer(panel)
        self.timer.setSingleShot(True)
        self.timer.setInterval(FLAG_DEBOUNCE_MS)
        self.timer.timeout.connect(self.request_checks)
        panel.model.flags_of = self._flag
        panel.model.on_edit = self._edit
        panel.add_button.clicked.connect(lambda: self.session.push(dataset_edit.add_pair(self.session.project)))
        panel.remove_button.clicked.connect(self.remove_selected)
        panel.import_button.clicked.connect(self.import_dialog)
        panel.template_button.clicked.connect(open_templates)
        self.refresh()

    # ---- document -> table
    def refresh(self, model_changed: bool = False):
        """Show the project's pairs (after any change of the prompts, undo and redo included); with
        `model_changed` the cached checks (of the previous model) are dropped."""
        if model_changed:
            self._cache.clear()
            self._rows = None
        changed = self.panel.model.set_pairs(dataset_edit.pairs_of(self.session.project.prompts))
        self._sync_rows(changed)
        self.panel.model.flags_changed(changed if changed and self.checks is None and not model_changed else None)
        if self.is_loaded() and self.checks is None:
            self.timer.start()

    def _sync_rows(self, changed):
        """Keep each row's cache key and check; only the `changed` rows are looked at unless the row count,
        prepend_bos or whether all pairs name positions changed."""
        pairs = self.panel.model.pairs
        if not self.is_loaded() or not pairs:
            self._rows, self.checks = None, None
            return
        bos = self.session.project.prompts.prepend_bos
        st = self._rows
        if st is not None and st.n == len(pairs) and st.bos == bos:
            named_count = st.named_count + sum(bool(pairs[i].spans) - bool(st.keys[i][0].spans) for i in changed)
            if (named_count == len(pairs)) == st.named:
                st.named_count = named_count
                for i in changed:
                    st.keys[i] = _check_key(pairs[i], st.named, bos)
                    st.checks[i] = self._cache.get(st.keys[i])
                    (st.missing.add if st.checks[i] is None else st.missing.discard)(i)
                self.checks = None if st.missing else st.checks
                return
        named_count = sum(1 for p in pairs if p.spans)
        named = named_count == len(pairs)
        keys = [_check_key(p, named, bos) for p in pairs]
        checks = [self._cache.get(k) for k in keys]
        self._rows = SimpleNamespace(n=len(pairs), bos=bos, named=named, named_count=named_count, keys=keys,
                                     checks=checks, missing={i for i, c in enumerate(checks) if c is None})
        self.checks = None if self._rows.missing else checks

    def _flag(self, row: int):
        if not self.is_loaded():
            return "", "load a model to check the tokens", None
        check = self._rows.checks[row] if self._rows is not None and row < self._rows.n else None
        if check is None:
            return "…", "checking…", None
        return ("⚠ " + check.problems[0] if check.problems else "ok", _tooltip(check),
                QColor(Qt.red) if check.problems else QColor(Qt.darkGreen))

    # ---- table -> document
    def _edit(self, row: int, field: str, text: str):
        pairs = self.panel.model.pairs
        if row < len(pairs):
            self.session.push(dataset_edit.edit_cell(self.session.project, row, field, text))

    def remove_selected(self):
        rows = sorted({i.row() for i in self.panel.table.selectionModel().selectedIndexes()})
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
        p = self.panel
        p.progress.setRange(0, 0)
        p.progress_label.setText(f"reading {Path(path).name}…")
        p.progress.show()
        p.progress_label.show()
        t0 = time.perf_counter()
        self.submit(read_file_job(str(path)), "dataset_import",
                    progress=lambda done, total, message: self._reading(done, total, message, t0),
                    finished=lambda data: (self._read_done(), self.session.push(dataset_edit.replace_all(
                        self.session.project, data.pairs, f"Import {Path(path).name}", str(path)))),
                    errored=lambda message, details="": (self._read_done(),
                                                         self.messages.show_error(message, details)),
                    cancelled=lambda _value: self._read_done())

    def _reading(self, done, total, message, t0):
        p = self.panel
        p.progress.setRange(0, max(total, 1))
        p.progress.setValue(min(done, max(total, 1)))
        p.progress_label.setText(time_left_text(done, total, time.perf_counter() - t0, message))

    def _read_done(self):
        self.panel.progress.hide()
        self.panel.progress_label.hide()

    # ---- flags
    def request_checks(self):
        st = self._rows
        if not self.is_loaded() or st is None or not st.missing:
            return
        missing = list(dict.fromkeys(st.keys[i] for i in sorted(st.missing)))
        self.checked_last = len(missing)
        self.submit(check_pairs_job([k[0] for k in missing], self.session.project.prompts.prepend_bos, st.named),
                    "dataset_check", finished=lambda checks, m=missing: self._store_checks(m, checks))

    def _store_checks(self, keys, checks):
        if checks is None or len(checks) != len(keys):
            return
        self._cache.update(zip(keys, checks))
        st = self._rows
        if st is None:
            return
        rows = sorted(st.missing)
        for i in rows:
            st.checks[i] = self._cache.get(st.keys[i])
        st.missing = {i for i in rows if st.checks[i] is None}
        self.checks = None if st.missing else st.checks
        if rows:
            self.panel.model.flags_changed(rows)
        if st.missing and self.is_loaded():
            self.timer.start()  # the pairs changed while this check ran: check the new ones
