"""Feature cards in the graph view: the hover card's contexts / output tokens, and the "Feature cards…" button that
builds them in the window's runner.

A card is the transcoder dashboard of one feature (engine/transcoder_dashboards.py): its density over a corpus,
its top activating contexts (the token windows, each token tinted by the feature's activation, the most
activating one highlighted, with its activation) and the output tokens its decoder row promotes / suppresses.
The cards of a graph live in its result (project/feature_cards.py), so a saved project re-opens with them. For
the bundled demo's transcoders the cards are built from the demo corpus as soon as a graph is shown (a fraction
of a second); elsewhere the button asks for a corpus file.
"""
from __future__ import annotations

from html import escape
from pathlib import Path

from PySide6.QtWidgets import QFileDialog, QHBoxLayout, QLabel, QPushButton, QWidget

from desktop_app.project.feature_cards import attach_cards, cards_info, cards_of, graph_features

N_CONTEXTS = 5  # top contexts kept per feature
WINDOW = 6  # tokens shown on each side of a context's peak
N_TOKENS = 6  # promoted / suppressed output tokens
PEAK = (244, 153, 40)  # the most activating token's background
UP, DOWN = "#b35806", "#2166ac"
CORPUS_FILTERS = "Text corpora (*.txt *.text *.md *.jsonl *.ndjson);;All files (*)"
NO_CARDS = "No feature cards yet: click “Feature cards…” to build them from a corpus."


def _tint(value: float, top: float) -> str:
    """White to PEAK by value / top."""
    t = max(0.0, min(1.0, value / top)) if top > 0 else 0.0
    r, g, b = (round(255 + (c - 255) * t * 0.8) for c in PEAK)
    return f"#{r:02x}{g:02x}{b:02x}"


def _token(text: str) -> str:
    """A token as text: its shown '·' is the space it stands for (ordinary spaces, so a long context wraps)."""
    return escape(text.replace("·", " "))


def context_html(ctx) -> str:
    """One context: its tokens tinted by activation, the peak token bold on the full highlight; '…' when it starts
    inside its document."""
    top = max(ctx.activation, 1e-12)
    parts = ["…"] if ctx.position - ctx.max_index > 0 else []  # the window starts inside its document
    for j, tok in enumerate(ctx.tokens):
        act = ctx.activations[j] if j < len(ctx.activations) else 0.0
        if j == ctx.max_index:
            parts.append(f'<span style="background-color:{_tint(1, 1)}"><b>{_token(tok)}</b></span>')
        elif act > 0:
            parts.append(f'<span style="background-color:{_tint(act, top)}">{_token(tok)}</span>')
        else:
            parts.append(_token(tok))
    return "".join(parts)


def _tokens_line(label: str, colour: str, items) -> str:
    shown = ", ".join(f"{_token(t)}&nbsp;{v:+.3g}" for t, v in items[:N_TOKENS])
    return f'<span style="color:{colour}"><b>{label}</b></span> {shown or "none"}'


def card_html(card, corpus: str = "") -> str:
    """The card body of one FeatureDashboard: density line, top contexts (a table), promoted and suppressed."""
    where = f" of {card.n_tokens:,} tokens of {escape(Path(corpus).name)}" if corpus else f" of {card.n_tokens:,} tokens"
    lines = [f"density {100 * card.density:.3g}%{where}, max activation {card.max_activation:.4g}"]
    if card.top_contexts:
        rows = "".join(f'<tr><td align="right" style="color:#555">{c.activation:.3g}&nbsp;</td>'
                       f'<td>{context_html(c)}</td></tr>'
                       for c in card.top_contexts[:N_CONTEXTS])
        lines.append(f"<table cellspacing=0 cellpadding=0>{rows}</table>")
    else:
        lines.append("never active in the corpus")
    if getattr(card, "output_note", ""):
        lines.append(f'<span style="color:#555">output tokens of its {escape(card.output_note)}</span>')
    lines.append(_tokens_line("promotes", UP, card.promoted))
    lines.append(_tokens_line("suppresses", DOWN, card.suppressed))
    return "<br>".join(lines)


def default_corpus(transcoders: str) -> str | None:
    """The bundled demo corpus when `transcoders` is the demo's transcoder set, else None."""
    from desktop_app.demo_assets import demo_corpus_path, demo_transcoders_dir

    try:
        same = bool(transcoders) and Path(transcoders).resolve() == demo_transcoders_dir().resolve()
    except OSError:
        return None
    corpus = demo_corpus_path()
    return str(corpus) if same and corpus.is_file() else None


def cards_job(transcoders: str, corpus: str, features: list[tuple[int, int]]):
    """A runner job: the transcoder dashboards of `features` over `corpus` with the loaded model."""
    def job(state, cancel):
        from desktop_app.engine.errors import ModelLoadError
        from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job

        if state.lm is None:
            raise ModelLoadError("no model is loaded; load the graph's model to build its feature cards.")
        return transcoder_dashboards_job(state.lm, transcoders, corpus, features=features, n_top=N_CONTEXTS,
                                         context=WINDOW, n_logit=N_TOKENS, cancel=cancel)
    return job


class FeatureCards(QWidget):
    """The button and its status line. `view` is the GraphView (its result and node arrays); attach(window) wires
    the window's runner and project."""

    def __init__(self, view, parent=None):
        super().__init__(parent)
        self.view = view
        self.submit = None  # submit(job, slot, **handlers): the window's JobRouter
        self.cancel_job = None
        self.computed_with_loaded = None  # result -> bool
        self.store = None  # result -> None: tell the project the result changed (it is saved with the cards)
        self.job_id: int | None = None
        self.cards: dict = {}
        self.corpus = ""
        self._auto_tried: set[int] = set()
        self.button = QPushButton("Feature cards…")
        self.button.setObjectName("graphCardsButton")
        self.button.setToolTip("Build the graph's feature cards (top contexts, promoted / suppressed tokens) from a "
                               "corpus text file, offline")
        self.button.clicked.connect(self.clicked)
        self.status = QLabel("")
        self.status.setObjectName("graphCardsStatus")
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.button)
        layout.addWidget(self.status)

    def attach(self, window) -> None:
        from desktop_app.ui.kind_views import computed_with_loaded

        self.submit = window._submit
        self.cancel_job = window.runner.cancel
        self.computed_with_loaded = lambda result: computed_with_loaded(window, result)

        def store(result):
            project = window.project
            for entry in project.analyses:
                if entry.result is result:
                    kept = entry.result_spec  # the spec it was computed with: the cards do not change it
                    project.set_result(entry.name, result, model=entry.result_model)
                    entry.result_spec = kept
                    return
        self.store = store

    # ---- the graph shown -------------------------------------------------------------------------------------
    @property
    def result(self):
        return self.view.result

    def transcoders(self) -> str:
        return str((self.result.params or {}).get("transcoders") or "") if self.result is not None else ""

    def set_graph(self, result) -> None:
        self.cards = cards_of(result)
        info = cards_info(result) or {}
        self.corpus = str(info.get("corpus", ""))
        if self.job_id is None:
            self._say_state()
        corpus = default_corpus(self.transcoders())
        if (not self.cards and corpus and self.submit is not None and id(result) not in self._auto_tried
                and self.computed_with_loaded is not None and self.computed_with_loaded(result)):
            self._auto_tried.add(id(result))
            self.build(corpus)

    def _say_state(self) -> None:
        if self.cards:
            n_tokens = next(iter(self.cards.values())).n_tokens
            self.status.setText(f"{len(self.cards)} cards from {Path(self.corpus).name} ({n_tokens:,} tokens)")
        else:
            self.status.setText("no feature cards")

    def html(self, i: int) -> str:
        """The card body of node i (a feature), or one line saying how to build the cards."""
        card = self.cards.get((int(self.view.layers[i]), int(self.view.feature[i])))
        if card is not None:
            return card_html(card, self.corpus)
        if self.cards:
            return "No card for this feature: click “Feature cards…” to rebuild the cards for this graph."
        return NO_CARDS

    # ---- building --------------------------------------------------------------------------------------------
    def clicked(self) -> None:
        if self.job_id is not None and self.cancel_job is not None:
            self.cancel_job(self.job_id)
            self.status.setText("cancelling the feature cards…")
            return
        start = default_corpus(self.transcoders()) or self.corpus or str(Path.home())
        path, _ = QFileDialog.getOpenFileName(self, "Corpus for the feature cards", start, CORPUS_FILTERS)
        if path:
            self.build(path)

    def build(self, corpus: str) -> int | None:
        """Build the cards of the shown graph's features over `corpus` in the runner; None (and a status line)
        when that cannot run."""
        result = self.result
        problem = self._problem(result)
        if problem:
            self.status.setText(problem)
            return None
        transcoders = self.transcoders()
        features = graph_features(result)
        self.status.setText(f"building {len(features)} feature cards from {Path(corpus).name}…")
        self.button.setText("Cancel cards")

        def done(dashboards):
            self._ended()
            attach_cards(result, dashboards, corpus, transcoders)
            if self.store is not None:
                self.store(result)
            if result is self.result:
                self.set_graph(result)

        def failed(message, _details=""):
            self._ended()
            self.status.setText(message)

        def cancelled(_value):
            self._ended()
            self.status.setText("feature cards cancelled; none were stored")

        self.job_id = self.submit(
            cards_job(transcoders, str(corpus), features), "feature_cards", finished=done, errored=failed,
            cancelled=cancelled,
            progress=lambda _done, _total, message: self.status.setText(f"feature cards: {message}…"))
        return self.job_id

    def _problem(self, result) -> str:
        if result is None:
            return "no graph is shown."
        if not self.transcoders():
            return "this graph carries no transcoder set (an opened JSON), so its feature cards cannot be built here."
        if not graph_features(result):
            return "this graph has no feature nodes to build cards for."
        if self.submit is None:
            return "this view is not attached to a window's runner; nothing was run."
        if self.computed_with_loaded is not None and not self.computed_with_loaded(result):
            return ("this graph was not computed with the loaded model, so no cards were built; re-run the graph "
                    "with this model first.")
        return ""

    def _ended(self) -> None:
        self.job_id = None
        self.button.setText("Feature cards…")
