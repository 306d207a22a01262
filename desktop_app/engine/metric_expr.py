"""Metrics the user writes (contract 6.2): arithmetic over logit / logprob / prob of single tokens.

    logit(answer) - logit(wrong)              the logit difference
    prob(' Mary') / (prob(' Mary') + prob(' John'))
    2 * logprob(answer) - 0.5

A small hand-written recursive-descent parser turns the text into a tree of tuples; nothing is ever passed to
eval. `answer` and `wrong` stand for each pair's own answer tokens; when a pair gives several (several spellings
of one answer) logit() uses the log-sum-exp of their logits, logprob() the log of their summed probability and
prob() their summed probability. Evaluation is vectorised over rows of last-position logits and stays
differentiable (attribution patching takes its gradient). A division by zero leaves that row NaN and is
reported per row, the other rows keep their values.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from desktop_app.engine.errors import SpecError

FUNCTIONS = ("logit", "logprob", "prob")
PAIR_TOKENS = {"answer": "answer", "wrong": "wrong", "wrong_answer": "wrong"}
MAX_DEPTH = 100  # nested signs and brackets
BUILTIN_EXPRESSIONS = {"logit_diff": "logit(answer) - logit(wrong)", "answer_prob": "prob(answer)"}


@dataclass
class _Tok:
    kind: str  # num, name, str, op, end
    text: str
    col: int  # 1-based column of the token's first character
    value: object = None


class _Syntax(Exception):
    def __init__(self, col: int, what: str):
        super().__init__(what)
        self.col, self.what = col, what


def _lex(text: str) -> list[_Tok]:
    toks, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isdigit() or (c == "." and i + 1 < n and text[i + 1].isdigit()):
            j = i
            while j < n and (text[j].isdigit() or text[j] == "."):
                j += 1
            if j < n and text[j] in "eE":
                k = j + 1 + (j + 1 < n and text[j + 1] in "+-")
                if k < n and text[k].isdigit():
                    j = k
                    while j < n and text[j].isdigit():
                        j += 1
            try:
                toks.append(_Tok("num", text[i:j], i + 1, float(text[i:j])))
            except ValueError:
                raise _Syntax(i + 1, f"the number {text[i:j]!r} is malformed") from None
            i = j
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            toks.append(_Tok("name", text[i:j], i + 1))
            i = j
        elif c in "'\"":
            j, out = i + 1, []
            while j < n and text[j] != c:
                if text[j] == "\\" and j + 1 < n:
                    out.append({"n": "\n", "t": "\t"}.get(text[j + 1], text[j + 1]))
                    j += 2
                else:
                    out.append(text[j])
                    j += 1
            if j >= n:
                raise _Syntax(i + 1, "the quoted token is not closed")
            toks.append(_Tok("str", text[i:j + 1], i + 1, "".join(out)))
            i = j + 1
        elif c in "+-*/(),":
            toks.append(_Tok("op", c, i + 1))
            i += 1
        else:
            raise _Syntax(i + 1, f"the character {c!r} is not allowed")
    toks.append(_Tok("end", "", n + 1))
    return toks


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ; unary := ('-'|'+') unary | atom ;
    atom := number | '(' expr ')' | func '(' (string | answer | wrong) ')'"""

    def __init__(self, text: str):
        self.toks = _lex(text)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def expect(self, op: str, what: str) -> None:
        tok = self.peek()
        if tok.kind != "op" or tok.text != op:
            raise _Syntax(tok.col, f"expected {what} but found {_shown(tok)}")
        self.take()

    def parse(self):
        tree = self.expr()
        tok = self.peek()
        if tok.kind != "end":
            raise _Syntax(tok.col, f"unexpected {_shown(tok)}")
        return tree

    def expr(self):
        node = self.term()
        while self.peek().kind == "op" and self.peek().text in "+-":
            op = self.take().text
            node = (op, node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek().kind == "op" and self.peek().text in "*/":
            tok = self.take()
            node = (tok.text, node, self.unary(), tok.col) if tok.text == "/" else ("*", node, self.unary())
        return node

    def unary(self):
        tok = self.peek()
        self.depth += 1
        if self.depth > MAX_DEPTH:  # before Python's own recursion limit, in the parser or in the evaluation
            raise _Syntax(tok.col, f"the expression nests signs or brackets more than {MAX_DEPTH} deep")
        if tok.kind == "op" and tok.text in "+-":
            self.take()
            inner = self.unary()
            node = ("neg", inner) if tok.text == "-" else inner
        else:
            node = self.atom()
        self.depth -= 1
        return node

    def atom(self):
        tok = self.take()
        if tok.kind == "num":
            return ("num", tok.value)
        if tok.kind == "op" and tok.text == "(":
            node = self.expr()
            self.expect(")", "')'")
            return node
        if tok.kind == "name":
            if tok.text in FUNCTIONS:
                self.expect("(", f"'(' after {tok.text}")
                arg = self.take()
                if arg.kind == "str":
                    ref = ("literal", arg.value, arg.col)
                elif arg.kind == "name" and arg.text in PAIR_TOKENS:
                    ref = ("pair", PAIR_TOKENS[arg.text])
                else:
                    raise _Syntax(arg.col, f"{tok.text}() takes a quoted token, answer or wrong, not {_shown(arg)}")
                self.expect(")", f"')' to close {tok.text}(")
                return (tok.text, ref)
            if tok.text in PAIR_TOKENS:
                raise _Syntax(tok.col, f"'{tok.text}' stands for tokens; write logit({tok.text}), "
                                       f"logprob({tok.text}) or prob({tok.text})")
            raise _Syntax(tok.col, f"'{tok.text}' is not a known name; use logit, logprob, prob, answer or wrong")
        raise _Syntax(tok.col, f"expected a number, a function or '(' but found {_shown(tok)}")


def _shown(tok: _Tok) -> str:
    return "the end of the expression" if tok.kind == "end" else repr(tok.text)


@dataclass
class TokenSets:
    """Per row, one or several token ids: `ids` [rows, k] padded, `mask` [rows, k] true where real."""
    ids: torch.Tensor
    mask: torch.Tensor

    @classmethod
    def of(cls, per_row) -> "TokenSets":
        rows = [list(r) if isinstance(r, (list, tuple)) else [int(r)] for r in per_row]
        k = max((len(r) for r in rows), default=1)
        ids = torch.zeros((len(rows), k), dtype=torch.long)
        mask = torch.zeros((len(rows), k), dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = True
        return cls(ids, mask)

    def rows(self, index) -> "TokenSets":
        index = torch.as_tensor(index, dtype=torch.long)
        return TokenSets(self.ids[index], self.mask[index])


class MetricExpression:
    """A parsed metric; `bind(token_id)` resolves its quoted tokens with the loaded model's vocabulary."""

    def __init__(self, text: str):
        if not isinstance(text, str) or not text.strip():
            raise SpecError("the metric expression is empty; write one such as logit(answer) - logit(wrong).")
        self.text = text
        try:
            self.tree = _Parser(text).parse()
        except _Syntax as err:
            raise SpecError(f"metric \"{text}\", column {err.col}: {err.what}.") from None

    def __repr__(self) -> str:
        return f"MetricExpression({self.text!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, MetricExpression) and other.text == self.text

    def __hash__(self) -> int:
        return hash(self.text)

    def nodes(self):
        """Every node of the tree, depth first."""
        stack = [self.tree]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(child for child in reversed(node[1:]) if isinstance(child, tuple))

    def literals(self) -> list[tuple[str, int]]:
        """(token text, column) of every quoted token."""
        return [(node[1], node[2]) for node in self.nodes() if node[0] == "literal"]

    def uses(self, which: str) -> bool:
        """Whether the expression reads the pair's `answer` or `wrong` tokens."""
        return any(node[0] == "pair" and node[1] == which for node in self.nodes())

    def bind(self, token_id: Callable[[str], int]) -> "BoundMetric":
        ids = {}
        for text, col in self.literals():
            try:
                ids[text] = int(token_id(text))
            except Exception as err:  # noqa: BLE001 - the tokenizer's own error, reworded with the column
                raise SpecError(f"metric \"{self.text}\", column {col}: the token {text!r} cannot be used "
                                f"({err}).") from None
        return BoundMetric(self, ids)


class BoundMetric:
    def __init__(self, expr: MetricExpression, literal_ids: dict[str, int]):
        self.expr = expr
        self.literal_ids = literal_ids

    def __call__(self, logits: torch.Tensor, answer: TokenSets | None, wrong: TokenSets | None):
        """(values [rows], divided_by_zero [rows] bool) for last-position logits [rows, vocab]."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, -1)
        zero = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        sets = {"answer": answer, "wrong": wrong}

        def ev(node):
            op = node[0]
            if op == "num":
                return torch.full((logits.shape[0],), float(node[1]), device=logits.device)
            if op == "neg":
                return -ev(node[1])
            if op in ("+", "-", "*"):
                a, b = ev(node[1]), ev(node[2])
                return a + b if op == "+" else a - b if op == "-" else a * b
            if op == "/":
                a, b = ev(node[1]), ev(node[2])
                bad = b == 0
                zero.logical_or_(bad)
                return a / torch.where(bad, torch.ones_like(b), b)
            source = logits if op == "logit" else logprobs
            ref = node[1]
            if ref[0] == "literal":
                picked = source[:, self.literal_ids[ref[1]]]
            else:
                ts = sets[ref[1]]
                if ts is None:
                    raise SpecError(f"metric \"{self.expr.text}\" uses {ref[1]}, but the pair has no "
                                    f"{'answer' if ref[1] == 'answer' else 'wrong answer'}; give one.")
                picked = _log_sum_exp(source, ts)
            return picked.exp() if op == "prob" else picked
        values = ev(self.expr.tree)
        values = torch.where(zero, torch.full_like(values, float("nan")), values)
        return values, zero


def _log_sum_exp(source: torch.Tensor, ts: TokenSets) -> torch.Tensor:
    ids, mask = ts.ids.to(source.device), ts.mask.to(source.device)
    if ids.shape[1] == 1:
        return source.gather(1, ids)[:, 0]
    vals = source.gather(1, ids).masked_fill(~mask, float("-inf"))
    return torch.logsumexp(vals, -1)


def parse_metric(metric) -> str | MetricExpression:
    """A metric as a spec gives it: a built-in name, or {"expression": "..."} / a MetricExpression."""
    from desktop_app.engine.metrics import METRICS

    if isinstance(metric, MetricExpression):
        return metric
    if isinstance(metric, str) and metric not in METRICS:  # a metric that is not a built-in name is an expression
        return MetricExpression(metric)
    if isinstance(metric, dict):
        unknown = sorted(set(metric) - {"expression"})
        if unknown or "expression" not in metric:
            raise SpecError("a metric object must hold exactly one field, 'expression', e.g. "
                            "{\"expression\": \"logit(answer) - logit(wrong)\"}.")
        return MetricExpression(metric["expression"])
    return metric


def metric_to_json(metric):
    return {"expression": metric.text} if isinstance(metric, MetricExpression) else metric
