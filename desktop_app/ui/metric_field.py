"""The Analysis panel's metric field as an expression editor (contract 6.2): completion of the word being typed
(`answer`, `wrong`, `logit(`, `logprob(`, `prob(`, the built-in metric names and the dataset's answer tokens)
and a one-line parse error under the field while typing. The engine's parser module imports torch, so the text
is parsed in the runner (the window never imports torch on the UI thread)."""
from __future__ import annotations

import re
from typing import Callable

from PySide6.QtCore import QStringListModel, Qt, QTimer
from PySide6.QtWidgets import QCompleter, QLabel

from desktop_app.project.specs import METRICS
from desktop_app.project import dataset_edit

WORDS = ("answer", "wrong", "logit(", "logprob(", "prob(")
PARSE_DEBOUNCE_MS = 120
_TRAILING = re.compile(r"('[^']*|\"[^\"]*|[A-Za-z_][A-Za-z_0-9]*)$")  # the word (or open quote) being typed


def parse_metric_job(text: str):
    """A runner job: "" when `text` is a built-in metric or a valid expression, else the parser's sentence."""
    def job(state, cancel):
        from desktop_app.engine.errors import SpecError
        from desktop_app.engine.metric_expr import MetricExpression

        if text in METRICS:
            return ""
        try:
            MetricExpression(text)
        except SpecError as err:
            return str(err)
        return ""
    return job


def completion_words(prompts, builtins: bool = True) -> list[str]:
    """Built-in names (only where the whole text is one word), the expression words and each answer / wrong
    token of the pairs, quoted."""
    tokens: list[str] = []
    for pair in dataset_edit.pairs_of(prompts):
        for t in pair.answers() + pair.wrongs():
            if t and repr(t) not in tokens:
                tokens.append(repr(t))
        if len(tokens) > 200:
            break
    return (list(METRICS) if builtins else []) + list(WORDS) + tokens


class MetricFieldAssist:
    """Attaches completion and the parse-error label to the (editable) metric combo box. Dependencies: the combo,
    the error label (placed under it), `submit` of the runner and `prompts()` (the project's prompts)."""

    def __init__(self, combo, error_label: QLabel, submit: Callable, prompts: Callable):
        self.combo, self.label, self.submit, self.prompts = combo, error_label, submit, prompts
        self.edit = combo.lineEdit()
        self.model = QStringListModel(completion_words(prompts()))
        self.completer = QCompleter(self.model, combo)
        self.completer.setObjectName("metricCompleter")
        self.completer.setCaseSensitivity(Qt.CaseInsensitive)
        self.completer.setWidget(self.edit)
        self.completer.activated.connect(self.insert_completion)
        self.error = ""
        self.parsed_text: str | None = None
        self.timer = QTimer(combo)
        self.timer.setSingleShot(True)
        self.timer.setInterval(PARSE_DEBOUNCE_MS)
        self.timer.timeout.connect(self.request_parse)
        self.edit.textEdited.connect(self._edited)
        combo.currentTextChanged.connect(lambda _t: self.timer.start())
        self.label.hide()

    def refresh_words(self, builtins: bool = True):
        self.model.setStringList(completion_words(self.prompts(), builtins))

    def prefix(self) -> str:
        """The word being typed at the cursor ('' when the cursor follows an operator or a bracket)."""
        before = self.edit.text()[:self.edit.cursorPosition()]
        m = _TRAILING.search(before)
        return m.group(1) if m else ""

    def _edited(self, _text: str):
        self.timer.start()
        prefix = self.prefix()
        if not prefix:
            self.completer.popup().hide()
            return
        self.refresh_words(builtins=prefix == self.edit.text()[:self.edit.cursorPosition()])
        self.completer.setCompletionPrefix(prefix)
        if self.completer.completionCount() and self.completer.currentCompletion() != prefix:
            self.completer.complete()
        else:
            self.completer.popup().hide()

    def insert_completion(self, word: str):
        """Replace the word being typed by `word`."""
        pos = self.edit.cursorPosition()
        text = self.edit.text()
        start = pos - len(self.prefix())
        self.edit.setText(text[:start] + word + text[pos:])
        self.edit.setCursorPosition(start + len(word))
        self.timer.start()

    def request_parse(self):
        text = self.combo.currentText()
        self.submit(parse_metric_job(text), "metric_parse", finished=lambda error: self._show(text, error))

    def _show(self, text: str, error: str):
        if text != self.combo.currentText():
            return  # an older text; a newer parse is on its way
        self.error, self.parsed_text = error, text
        self.label.setText(error)
        self.label.setToolTip(error)
        self.label.setVisible(bool(error))
