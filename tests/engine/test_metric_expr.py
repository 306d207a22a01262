"""Metric expressions: parsed by hand (never eval), equal to the same computation written out, one-line errors
with the column, per-row division by zero."""
import pytest
import torch

from desktop_app.engine.errors import SpecError
from desktop_app.engine.metric_expr import BUILTIN_EXPRESSIONS, MetricExpression, TokenSets, parse_metric
from desktop_app.engine.metrics import MetricContext

VOCAB = {" Mary": 3, " John": 5, " mary": 7}


def bound(text):
    return MetricExpression(text).bind(lambda t: VOCAB[t])


@pytest.fixture
def logits():
    return torch.randn(6, 11, generator=torch.Generator().manual_seed(0))


def test_arithmetic_and_tokens_equal_hand_computation(logits):
    lp = torch.log_softmax(logits, -1)
    p = lp.exp()
    v, zero = bound("2 * (logit(' Mary') - logit(' John')) / 4 + -logprob(\" John\") - prob(' Mary') * 1.5e1")(
        logits, None, None)
    hand = 2 * (logits[:, 3] - logits[:, 5]) / 4 + -lp[:, 5] - p[:, 3] * 15.0
    torch.testing.assert_close(v, hand, rtol=0, atol=1e-6)
    assert not zero.any()


def test_precedence_is_usual(logits):
    v, _ = bound("1 - 2 - 3 * 2 / 4")(logits, None, None)
    assert torch.allclose(v, torch.full((6,), 1 - 2 - 3 * 2 / 4))


def test_answer_and_wrong_per_row_with_lists_use_log_sum_exp(logits):
    answer = TokenSets.of([3, (3, 7), 1, 2, (4, 5, 6), 0])
    wrong = TokenSets.of([5, 5, (8, 9), 2 + 1, 4 + 6, 1])
    v, _ = bound("logit(answer) - logit(wrong)")(logits, answer, wrong)
    sets_a = [[3], [3, 7], [1], [2], [4, 5, 6], [0]]
    sets_w = [[5], [5], [8, 9], [3], [10], [1]]
    for r in range(6):
        hand = torch.logsumexp(logits[r, sets_a[r]], 0) - torch.logsumexp(logits[r, sets_w[r]], 0)
        assert abs(float(v[r] - hand)) < 1e-5
    pv, _ = bound("prob(answer)")(logits, answer, wrong)
    p = torch.softmax(logits, -1)
    for r in range(6):
        assert abs(float(pv[r] - p[r, sets_a[r]].sum())) < 1e-6


def test_builtins_equal_metric_context(logits):
    a, w = TokenSets.of([3] * 6), TokenSets.of([5] * 6)
    for name, text in BUILTIN_EXPRESSIONS.items():
        ctx = MetricContext(name, 3, 5, logits[0], logits[1])
        torch.testing.assert_close(bound(text)(logits, a, w)[0], ctx(logits), rtol=0, atol=1e-6)
    # a bound expression is also accepted by MetricContext itself, and answer lists there use log-sum-exp
    ctx = MetricContext(bound("logit(answer) - logit(wrong)"), (3, 7), 5, logits[0], logits[1])
    torch.testing.assert_close(ctx(logits), torch.logsumexp(logits[:, [3, 7]], -1) - logits[:, 5])
    ctx = MetricContext("logit_diff", (3, 7), 5, logits[0], logits[1])
    torch.testing.assert_close(ctx(logits), torch.logsumexp(logits[:, [3, 7]], -1) - logits[:, 5])


def test_division_by_zero_is_reported_per_row(logits):
    logits = logits.clone()
    logits[2, 3] = logits[2, 5]
    v, zero = bound("1 / (logit(' Mary') - logit(' John'))")(logits, None, None)
    assert zero.tolist() == [False, False, True, False, False, False]
    assert torch.isnan(v[2]) and torch.isfinite(v[[0, 1, 3, 4, 5]]).all()


@pytest.mark.parametrize("text,col,words", [
    ("logit(' Mary')) - 1", 15, "unexpected ')'"),
    ("logits(answer)", 1, "'logits' is not a known name"),
    ("answer - 1", 1, "stands for tokens"),
    ("logit(answer", 13, "expected ')'"),
    ("1 +", 4, "expected a number"),
    ("prob(Mary)", 6, "takes a quoted token"),
    ("2 ** 3", 4, "expected a number"),
    ("__import__('os')", 1, "not a known name"),
    ("logit(' Mary') ; 1", 16, "not allowed"),
    ("(" * 101 + "1" + ")" * 101, 101, "more than 100 deep"),
    ("-" * 3000 + "1", 101, "more than 100 deep"),
])
def test_errors_are_one_line_with_the_column(text, col, words):
    with pytest.raises(SpecError) as err:
        MetricExpression(text)
    msg = str(err.value)
    assert f"column {col}:" in msg and words in msg and "\n" not in msg


def test_unknown_token_points_at_its_column():
    with pytest.raises(SpecError, match="column 24: the token ' Zed'"):
        bound("logit(' Mary') - logit(' Zed')")


def test_parse_metric_accepts_names_and_objects():
    assert parse_metric("logit_diff") == "logit_diff"
    assert parse_metric({"expression": "prob(answer)"}) == MetricExpression("prob(answer)")
    with pytest.raises(SpecError, match="exactly one field"):
        parse_metric({"expr": "prob(answer)"})


def test_nesting_up_to_the_limit_parses_and_evaluates(logits):
    values, _ = MetricExpression("(" * 98 + "-" + "2" + ")" * 98).bind(lambda t: 0)(logits, None, None)
    assert torch.equal(values, torch.full((logits.shape[0],), -2.0))
