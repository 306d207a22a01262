"""The Analysis panel's metric field as an expression editor (contract 6.2): completion of the word being typed
(`answer`, `wrong`, `logit(`, `logprob(`, `prob(`, the built-in metric names, the dataset's answer tokens and,
after `logit(` / `logprob(` / `prob(` and an open quote, the loaded model's vocabulary tokens that start with
what is typed) and a one-line parse error under the field while typing. The vocabulary list is built once per
loaded model in the runner (`vocabulary_job`). The engine's parser module imports torch, so the text
is parsed in the runner (the window never imports torch on the UI thread)."""
from __future__ import annotations

import bisect
import re
from typing import Callable

from PySide6.QtCore import QStringListModel, Qt, QTimer
from PySide6.QtWidgets import QCompleter, QLabel

from desktop_app.project.specs import METRICS
from desktop_app.project import dataset_edit

WORDS = ("answer", "wrong", "logit(", "logprob(", "prob(")
PARSE_DEBOUNCE_MS = 120
_TRAILING = re.compile(r"('[^']*|\"[^\"]*|[A-Za-z_][A-Za-z_0-9]*)$")  # the word (or open quote) being typed
_TOKEN_ARGUMENT = re.compile(r"\b(logit|logprob|prob)\(\s*$")  # what precedes a quoted token
VOCABULARY_SHOWN = 50  # vocabulary tokens offered at most, shortest first
VOCABULARY_SCANNED = 5000  # matches looked at before the shortest are picked (a prefix like ' ' matches half)


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


def answer_words(prompts) -> list[str]:
    """Each answer / wrong token of the pairs, quoted (the first 200 different ones)."""
    tokens: dict[str, None] = {}
    for pair in dataset_edit.pairs_of(prompts):
        for t in pair.answers() + pair.wrongs():
            if t:
                tokens.setdefault(repr(t))
        if len(tokens) > 200:
            break
    return list(tokens)


def completion_words(prompts, builtins: bool = True) -> list[str]:
    """Built-in names (only where the whole text is one word), the expression words and each answer / wrong
    token of the pairs, quoted."""
    return (list(METRICS) if builtins else []) + list(WORDS) + answer_words(prompts)


def quoted(text: str, quote: str = "'") -> str:
    """`text` as the metric parser reads a quoted token (backslash escapes for the quote, \\, newline, tab)."""
    body = text.replace("\\", "\\\\").replace(quote, "\\" + quote).replace("\n", "\\n").replace("\t", "\\t")
    return quote + body + quote


def vocabulary_job():
    """A runner job: the loaded model's vocabulary as texts that tokenise back to exactly their own one token
    (so each one offered is usable in logit('...')), sorted case-insensitively for prefix search."""
    def job(state, cancel):
        lm = state.lm
        if lm is None:
            return None
        tok = lm.tokenizer
        n = len(tok)
        special = set(getattr(tok, "all_special_ids", []) or [])
        out = []
        for start in range(0, n, 4096):
            cancel.check()
            ids = [i for i in range(start, min(n, start + 4096)) if i not in special]
            texts = tok.batch_decode([[i] for i in ids])
            usable = [(i, t) for i, t in zip(ids, texts)
                      if t and "\ufffd" not in t and all(c.isprintable() or c in "\n\t" for c in t)]
            back = tok([t for _, t in usable], add_special_tokens=False)["input_ids"] if usable else []
            out.extend(t for (i, t), b in zip(usable, back) if list(b) == [i])
        return VocabularyIndex(out)
    return job


class VocabularyIndex:
    """Vocabulary texts sorted by their lower-case form: the tokens starting with a prefix in O(log n)."""

    def __init__(self, texts):
        pairs = sorted(set((t.lower(), t) for t in texts))
        self.lower = [a for a, _ in pairs]
        self.texts = [b for _, b in pairs]

    def __len__(self):
        return len(self.texts)

    def starting_with(self, prefix: str, limit: int = VOCABULARY_SHOWN) -> list[str]:
        """The shortest `limit` tokens starting with `prefix` (case-insensitive) among the first
        VOCABULARY_SCANNED matches in sorted order."""
        low = prefix.lower()
        i = bisect.bisect_left(self.lower, low)
        found = []
        while i < len(self.lower) and self.lower[i].startswith(low) and len(found) < VOCABULARY_SCANNED:
            found.append(self.texts[i])
            i += 1
        return sorted(found, key=lambda t: (len(t), t))[:limit]


class MetricFieldAssist:
    """Attaches completion and the parse-error label to the (editable) metric combo box. Dependencies: the combo,
    the error label (placed under it), `submit` of the runner and `prompts()` (the project's prompts)."""

    def __init__(self, combo, error_label: QLabel, submit: Callable, prompts: Callable):
        self.combo, self.label, self.submit, self.prompts = combo, error_label, submit, prompts
        self.edit = combo.lineEdit()
        self._answer_words: list[str] | None = None  # of the current prompts; computed when next typed
        self.vocabulary: VocabularyIndex | None = None  # of the loaded model
        self._vocabulary_for = 0  # which load the list being built belongs to
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

    def prompts_changed(self):
        """The pairs changed: their answer tokens are read again when completion next needs them."""
        self._answer_words = None

    def load_vocabulary(self):
        """Build the loaded model's vocabulary list in the runner (once per loaded model)."""
        self.vocabulary = None
        self._vocabulary_for += 1
        self.submit(vocabulary_job(), "metric_vocabulary",
                    finished=lambda index, n=self._vocabulary_for: self._set_vocabulary(index, n))

    def _set_vocabulary(self, index, generation: int):
        if generation == self._vocabulary_for:  # not a list of a model loaded before
            self.vocabulary = index

    def model_unloaded(self):
        self.vocabulary = None
        self._vocabulary_for += 1

    def vocabulary_words(self, typed: str) -> list[str]:
        """Vocabulary tokens for an open quote typed right after logit( / logprob( / prob( with at least one
        character after the quote, quoted the way it was opened."""
        if self.vocabulary is None or len(typed) < 2 or typed[0] not in "'\"":
            return []
        before = self.edit.text()[:self.edit.cursorPosition() - len(typed)]
        if not _TOKEN_ARGUMENT.search(before):
            return []
        return [quoted(t, typed[0]) for t in self.vocabulary.starting_with(typed[1:])]

    def refresh_words(self, builtins: bool = True, typed: str = ""):
        if self._answer_words is None:
            self._answer_words = answer_words(self.prompts())
        words = (list(METRICS) if builtins else []) + list(WORDS) + self._answer_words
        known = set(words)
        extra = [w for w in self.vocabulary_words(typed) if w not in known]
        self.model.setStringList(words + extra)

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
        self.refresh_words(builtins=prefix == self.edit.text()[:self.edit.cursorPosition()], typed=prefix)
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
