"""The metric field: completion of the word being typed and a one-line parse error while typing."""
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QLabel

from desktop_app.engine.datasets import PairText
from desktop_app.engine.errors import SpecError
from desktop_app.project.dataset_edit import SetPairs

from ui_helpers import child


def _metric_combo(window):
    combo = child(window, "analysisKindCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("activation_patching"))
    return child(window, "metricCombo", QComboBox)


def _type(qtbot, combo, text):
    combo.lineEdit().setFocus()
    combo.lineEdit().clear()
    qtbot.keyClicks(combo.lineEdit(), text)


def test_a_bad_expression_shows_the_parser_sentence_and_a_good_one_clears_it(qtbot, window):
    combo = _metric_combo(window)
    label = child(window, "metricErrorLabel", QLabel)
    text = "logit(answer) - * logit(wrong)"
    _type(qtbot, combo, text)
    try:
        from desktop_app.engine.metric_expr import MetricExpression
        MetricExpression(text)
        raise AssertionError("the reference parser accepted a bad expression")
    except SpecError as err:
        expected = str(err)
    qtbot.waitUntil(lambda: window.metric_assist.parsed_text == text, timeout=10_000)
    assert label.text() == expected and "column" in expected and label.isVisible()
    _type(qtbot, combo, "logprob(answer) - logprob(wrong)")
    qtbot.waitUntil(lambda: window.metric_assist.parsed_text == "logprob(answer) - logprob(wrong)", timeout=10_000)
    assert label.text() == "" and not label.isVisible()


def test_completion_offers_the_words_and_the_dataset_tokens(qtbot, window):
    window.session.push(SetPairs(window.project, [PairText("a b c", "a b d", " Mary", " John")], "set"))
    combo = _metric_combo(window)
    assist = window.metric_assist
    _type(qtbot, combo, "logit(answer) - lo")
    assert assist.prefix() == "lo"
    popup = assist.completer.popup()
    assert popup.isVisible()
    shown = [assist.completer.completionModel().index(i, 0).data() for i in range(assist.completer.completionCount())]
    assert shown == ["logit(", "logprob("]
    assist.insert_completion("logprob(")
    assert combo.currentText() == "logit(answer) - logprob("
    _type(qtbot, combo, "prob(' M")
    shown = [assist.completer.completionModel().index(i, 0).data() for i in range(assist.completer.completionCount())]
    assert shown == ["' Mary'"]
    assist.insert_completion("' Mary'")
    assert combo.currentText() == "prob(' Mary'"
    _type(qtbot, combo, "prob(wr")
    assist.insert_completion(assist.completer.currentCompletion())
    assert combo.currentText() == "prob(wrong"


def test_builtin_names_are_offered_only_as_the_whole_metric(qtbot, window):
    combo = _metric_combo(window)
    assist = window.metric_assist
    _type(qtbot, combo, "logit")
    shown = [assist.completer.completionModel().index(i, 0).data() for i in range(assist.completer.completionCount())]
    assert shown == ["logit_diff", "logit_diff_recovered", "logit("]


def _shown(assist):
    return [assist.completer.completionModel().index(i, 0).data() for i in range(assist.completer.completionCount())]


def test_quoted_tokens_read_back_by_the_metric_parser():
    from desktop_app.engine.metric_expr import MetricExpression
    from desktop_app.ui.metric_field import quoted

    for text in (" Mary", "it's", 'say "hi"', "back\\slash", "a\nb", "\tx"):
        for q in "'\"":
            literals = [t for t, _col in MetricExpression(f"logit({quoted(text, q)})").literals()]
            assert literals == [text], (text, q, literals)


def test_vocabulary_tokens_are_offered_after_a_function_and_a_quote(qtbot, window, gpt2_dir):
    from transformers import AutoTokenizer

    from ui_helpers import load_model
    from desktop_app.ui.metric_field import VOCABULARY_SHOWN, quoted

    load_model(qtbot, window, gpt2_dir)
    assist = window.metric_assist
    qtbot.waitUntil(lambda: assist.vocabulary is not None, timeout=30_000)
    # the reference: every id whose decoded text tokenises back to that one id, brute force
    tok = AutoTokenizer.from_pretrained(gpt2_dir)
    special = set(tok.all_special_ids)
    vocab = set()
    for i in range(len(tok)):
        t = tok.decode([i])
        if (i not in special and t and "\ufffd" not in t and all(c.isprintable() or c in "\n\t" for c in t)
                and tok(t, add_special_tokens=False)["input_ids"] == [i]):
            vocab.add(t)
    assert len(assist.vocabulary) == len(vocab)
    prefix = max(("th", " t", " a", "s"), key=lambda p: sum(v.lower().startswith(p) for v in vocab))
    matches = sorted((v for v in vocab if v.lower().startswith(prefix)), key=lambda v: (len(v), v))
    assert len(matches) > 1

    combo = _metric_combo(window)
    _type(qtbot, combo, "logprob(answer) - logit('" + prefix)
    expected = [quoted(v, "'") for v in matches[:VOCABULARY_SHOWN]]
    shown = [w for w in _shown(assist) if w not in ("answer", "wrong")]
    assert sorted(shown) == sorted(expected) and len(shown) <= VOCABULARY_SHOWN
    assist.insert_completion(expected[0])
    assert combo.currentText() == "logprob(answer) - logit(" + expected[0]

    _type(qtbot, combo, 'prob("' + prefix)  # the quote the user opened
    assert all(w.startswith('"') for w in _shown(assist)) and _shown(assist)
    _type(qtbot, combo, "'" + prefix)  # not a function's argument: no vocabulary
    assert _shown(assist) == []
    _type(qtbot, combo, "logit('")  # no prefix typed yet: no vocabulary
    assert _shown(assist) == []
