"""The Prompts dock's datasetTable and the template dialog, driven by object name and read back."""
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QLineEdit, QSpinBox, QTableView

from desktop_app.engine import templates
from desktop_app.engine.datasets import PairText
from desktop_app.project.dataset_edit import SetPairs

from ui_helpers import child, load_model

PAIRS = [PairText("When Mary and John went to the store, John gave a drink to",
                  "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
         PairText("When Alice and Bob went to the park, Bob gave a book to",
                  "When Alice and Bob went to the park, Alice gave a book to", " Alice", " Bob")]


def _text(table, r, c):
    return table.model().index(r, c).data()


def _count(table):
    return table.model().rowCount()


def _edit(table, r, c, text):
    """What a finished cell edit does."""
    assert table.model().setData(table.model().index(r, c), text)


def _rows(table):
    return [[_text(table, r, c) for c in range(4)] for r in range(_count(table))]


class _Flag:
    def __init__(self, model, row):
        self.index = model.index(row, 4)

    def text(self):
        return self.index.data()

    def toolTip(self):
        return self.index.data(Qt.ToolTipRole)


def _set(window, pairs):
    window.session.push(SetPairs(window.project, pairs, "set"))


def test_table_shows_edits_adds_removes_with_undo(qtbot, window):
    table = child(window, "datasetTable", QTableView)
    assert _count(table) == 0
    _set(window, PAIRS)
    assert _rows(table) == [[p.clean, p.corrupted, p.answer, p.wrong_answer] for p in PAIRS]

    _edit(table, 1, 2, " Carol")
    assert window.project.prompts.pairs[1].answer == " Carol"
    _edit(table, 0, 3, '[" John", " john"]')  # several spellings as a JSON list
    assert window.project.prompts.pairs[0].wrong_answer == (" John", " john")
    window.undo_stack.undo()
    assert window.project.prompts.pairs[0].wrong_answer == " John"
    assert _text(table, 0, 3) == " John"
    window.undo_stack.undo()
    assert window.project.prompts.pairs[1].answer == " Alice" and _text(table, 1, 2) == " Alice"

    qtbot.mouseClick(child(window, "addPairButton"), Qt.LeftButton)
    assert _count(table) == 3 and len(window.project.prompts.pairs) == 3
    table.selectRow(0)
    qtbot.mouseClick(child(window, "removePairButton"), Qt.LeftButton)
    assert [p.clean for p in window.project.prompts.pairs] == [PAIRS[1].clean, ""]
    assert _text(table, 0, 0) == PAIRS[1].clean
    window.undo_stack.undo()
    assert _count(table) == 3 and _text(table, 0, 0) == PAIRS[0].clean


def test_import_csv_and_a_bad_file_is_one_sentence(qtbot, window, tmp_path):
    good = tmp_path / "pairs.csv"
    good.write_text("clean,corrupted,answer,wrong_answer\n"
                    + "".join(f'"{p.clean}","{p.corrupted}",{p.answer},{p.wrong_answer}\n' for p in PAIRS),
                    encoding="utf-8")
    table = child(window, "datasetTable", QTableView)
    window.dataset_ctl.import_file(good)
    qtbot.waitUntil(lambda: _count(table) == 2, timeout=10_000)
    assert [p.clean for p in window.project.prompts.pairs] == [p.clean for p in PAIRS]
    assert window.undo_stack.undo_text() == "Import pairs.csv"

    bad = tmp_path / "bad.csv"
    bad.write_text("clean,answer\nA,B\n", encoding="utf-8")
    window.dataset_ctl.import_file(bad)
    qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=10_000)
    text = window.message_bar.text()
    assert "corrupted" in text and text.count(". ") == 0, text  # one sentence naming the missing column
    assert _count(table) == 2  # the dataset is unchanged


def test_flags_name_multi_token_answers_and_unaligned_lengths(qtbot, window, gpt2_dir):
    load_model(qtbot, window, gpt2_dir)
    lm_pieces = None
    pairs = [PAIRS[0], PairText(PAIRS[1].clean, PAIRS[1].corrupted, " Alicebobcarol", " Bob"),
             PairText(PAIRS[1].clean, PAIRS[1].clean + " and then", " Alice", " Bob")]
    _set(window, pairs)
    table = child(window, "datasetTable", QTableView)
    qtbot.waitUntil(lambda: window.dataset_ctl.checks is not None, timeout=20_000)
    model = table.model()
    flags = [_Flag(model, r) for r in range(3)]
    assert flags[0].text() == "ok"
    checks = window.dataset_ctl.checks
    # the independent reference: the loaded model's own tokeniser, run here
    from desktop_app.engine.loading import load_model as load
    lm = load(str(gpt2_dir), dtype="float32", device="cpu")
    lm_pieces = lm.token_pieces(" Alicebobcarol").display
    assert len(lm_pieces) > 1
    assert flags[1].text().startswith("⚠") and "answer ' Alicebobcarol'" in flags[1].text()
    assert " | ".join(lm_pieces) in flags[1].toolTip()
    clean = lm.tokenize(PAIRS[1].clean).display
    longer = lm.tokenize(PAIRS[1].clean + " and then").display
    assert flags[2].text().startswith("⚠") and f"{len(clean)} tokens" in flags[2].text()
    assert "corrupted: " + " | ".join(longer) in flags[2].toolTip()
    assert checks[0].problems == []


def test_template_dialog_fills_the_dataset_deterministically(qtbot, window):
    qtbot.mouseClick(child(window, "templateButton"), Qt.LeftButton)
    dialog = child(window, "templateDialog")
    combo = child(dialog, "templateFamilyCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("ioi"))
    child(dialog, "templateCountSpin", QSpinBox).setValue(6)
    child(dialog, "templateSeedSpin", QSpinBox).setValue(7)
    child(dialog, "templateNamesEdit", QLineEdit).setText("Ann, Ben, Cal, Dee, Eve, Fay")
    qtbot.mouseClick(child(dialog, "templateGenerateButton"), Qt.LeftButton)
    expected = templates.generate("ioi", 6, 7, names=["Ann", "Ben", "Cal", "Dee", "Eve", "Fay"]).pairs
    assert list(window.project.prompts.pairs) == list(expected)
    table = child(window, "datasetTable", QTableView)
    assert _rows(table)[5] == [expected[5].clean, expected[5].corrupted, expected[5].answer, expected[5].wrong_answer]
    window.undo_stack.undo()
    assert _count(table) == 0


def test_template_dialog_shows_a_bad_setting_and_stays_open(qtbot, window):
    dialog = window.open_template_dialog()
    combo = child(dialog, "templateFamilyCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("ioi"))
    child(dialog, "templateNamesEdit", QLineEdit).setText("Ann, Ben")
    qtbot.mouseClick(child(dialog, "templateGenerateButton"), Qt.LeftButton)
    assert "at least 5 different names" in child(dialog, "templateErrorLabel").text()
    assert dialog.isVisible() and window.undo_stack.undo_text() == ""


def test_an_edit_repaints_one_row_and_retokenises_only_that_pair(qtbot, window, gpt2_dir):
    load_model(qtbot, window, gpt2_dir)
    pairs = [PairText(f"When Mary and John went to the store {i}, John gave a drink to",
                      f"When Mary and John went to the store {i}, Mary gave a drink to", " Mary", " John")
             for i in range(12)]
    _set(window, pairs)
    ctl = window.dataset_ctl
    qtbot.waitUntil(lambda: ctl.checks is not None, timeout=20_000)
    assert ctl.checked_last == 12
    table = child(window, "datasetTable", QTableView)
    changed = []
    table.model().dataChanged.connect(lambda a, b, *_: changed.append((a.row(), b.row(), a.column(), b.column())))
    _edit(table, 5, 2, " Alicebobcarol")
    assert changed[0] == (5, 5, 0, 4)  # the edited row only (then its flag)
    qtbot.waitUntil(lambda: ctl.checks is not None, timeout=20_000)
    assert ctl.checked_last == 1  # only the edited pair went to the tokeniser
    assert _text(table, 5, 4).startswith("⚠") and "Alicebobcarol" in _text(table, 5, 4)
    # the cached checks equal a fresh check of every pair
    from desktop_app.ui.dataset_table import check_pairs_job

    class State:
        lm = None

    from desktop_app.engine.loading import load_model as load
    State.lm = load(str(gpt2_dir), dtype="float32", device="cpu")

    class Never:
        def check(self):
            pass

    fresh = check_pairs_job(window.project.prompts.pairs)(State, Never())
    assert [(c.tokens, c.problems) for c in ctl.checks] == [(c.tokens, c.problems) for c in fresh]
    assert [_text(table, r, 4) for r in range(12)] == [
        "⚠ " + c.problems[0] if c.problems else "ok" for c in fresh]
    window.undo_stack.undo()
    qtbot.waitUntil(lambda: ctl.checks is not None, timeout=20_000)
    assert _text(table, 5, 4) == "ok"


def test_time_left_of_a_file_being_read():
    from desktop_app.ui.dataset_table import time_left_text

    assert time_left_text(2_000_000, 10_000_000, 2.0, "reading x.csv: 5000 pairs") == \
        "20% · 1.0 MB/s · 8 s left · reading x.csv: 5000 pairs"
    assert time_left_text(0, 10, 0.0, "starting") == "0% · starting"


def test_import_of_a_big_file_shows_progress_with_time_left(qtbot, window, tmp_path):
    import csv

    path = tmp_path / "big.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clean", "corrupted", "answer", "wrong_answer"])
        for i in range(20_000):
            w.writerow([f"{i} {PAIRS[0].clean}", f"{i} {PAIRS[0].corrupted}", PAIRS[0].answer, PAIRS[0].wrong_answer])
    ctl = window.dataset_ctl
    seen = []
    shown = ctl._reading

    def spy(done, total, message, t0):
        shown(done, total, message, t0)
        seen.append((done, total, child(window, "datasetProgressLabel").text(),
                     child(window, "datasetProgressBar").isVisible()))
    ctl._reading = spy
    table = child(window, "datasetTable", QTableView)
    ctl.import_file(path)
    qtbot.waitUntil(lambda: _count(table) == 20_000, timeout=30_000)
    assert seen and seen[-1][0] == seen[-1][1] == path.stat().st_size
    assert all(visible and "s left" in text and "pairs" in text for _d, _t, text, visible in seen), seen
    assert "100%" in seen[-1][2] and "20000 pairs" in seen[-1][2]
    assert not child(window, "datasetProgressBar").isVisible()
    assert window.project.prompts.pairs[19_999].clean == f"19999 {PAIRS[0].clean}"


def test_loading_a_model_after_the_pairs_checks_them_all(qtbot, window, gpt2_dir):
    _set(window, PAIRS)
    table = child(window, "datasetTable", QTableView)
    assert _text(table, 0, 4) == "" and window.dataset_ctl.checks is None
    load_model(qtbot, window, gpt2_dir)
    qtbot.waitUntil(lambda: window.dataset_ctl.checks is not None, timeout=20_000)
    assert [_text(table, r, 4) for r in range(2)] == ["ok", "ok"]
