"""The Prompts dock's datasetTable and the template dialog, driven by object name and read back."""
import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QLineEdit, QSpinBox, QTableWidget

from desktop_app.engine import templates
from desktop_app.engine.datasets import PairText
from desktop_app.project.dataset_edit import SetPairs

from ui_helpers import child, load_model

PAIRS = [PairText("When Mary and John went to the store, John gave a drink to",
                  "When Mary and John went to the store, Mary gave a drink to", " Mary", " John"),
         PairText("When Alice and Bob went to the park, Bob gave a book to",
                  "When Alice and Bob went to the park, Alice gave a book to", " Alice", " Bob")]


def _rows(table):
    return [[table.item(r, c).text() for c in range(4)] for r in range(table.rowCount())]


def _set(window, pairs):
    window.session.push(SetPairs(window.project, pairs, "set"))


def test_table_shows_edits_adds_removes_with_undo(qtbot, window):
    table = child(window, "datasetTable", QTableWidget)
    assert table.rowCount() == 0
    _set(window, PAIRS)
    assert _rows(table) == [[p.clean, p.corrupted, p.answer, p.wrong_answer] for p in PAIRS]

    table.item(1, 2).setText(" Carol")  # what a finished cell edit does
    assert window.project.prompts.pairs[1].answer == " Carol"
    table.item(0, 3).setText('[" John", " john"]')  # several spellings as a JSON list
    assert window.project.prompts.pairs[0].wrong_answer == (" John", " john")
    window.undo_stack.undo()
    assert window.project.prompts.pairs[0].wrong_answer == " John"
    assert table.item(0, 3).text() == " John"
    window.undo_stack.undo()
    assert window.project.prompts.pairs[1].answer == " Alice" and table.item(1, 2).text() == " Alice"

    qtbot.mouseClick(child(window, "addPairButton"), Qt.LeftButton)
    assert table.rowCount() == 3 and len(window.project.prompts.pairs) == 3
    table.selectRow(0)
    qtbot.mouseClick(child(window, "removePairButton"), Qt.LeftButton)
    assert [p.clean for p in window.project.prompts.pairs] == [PAIRS[1].clean, ""]
    assert table.item(0, 0).text() == PAIRS[1].clean
    window.undo_stack.undo()
    assert table.rowCount() == 3 and table.item(0, 0).text() == PAIRS[0].clean


def test_import_csv_and_a_bad_file_is_one_sentence(qtbot, window, tmp_path):
    good = tmp_path / "pairs.csv"
    good.write_text("clean,corrupted,answer,wrong_answer\n"
                    + "".join(f'"{p.clean}","{p.corrupted}",{p.answer},{p.wrong_answer}\n' for p in PAIRS),
                    encoding="utf-8")
    table = child(window, "datasetTable", QTableWidget)
    window.dataset_ctl.import_file(good)
    qtbot.waitUntil(lambda: table.rowCount() == 2, timeout=10_000)
    assert [p.clean for p in window.project.prompts.pairs] == [p.clean for p in PAIRS]
    assert window.undo_stack.undo_text() == "Import pairs.csv"

    bad = tmp_path / "bad.csv"
    bad.write_text("clean,answer\nA,B\n", encoding="utf-8")
    window.dataset_ctl.import_file(bad)
    qtbot.waitUntil(lambda: window.message_bar.level == "error", timeout=10_000)
    text = window.message_bar.text()
    assert "corrupted" in text and text.count(". ") == 0, text  # one sentence naming the missing column
    assert table.rowCount() == 2  # the dataset is unchanged


def test_flags_name_multi_token_answers_and_unaligned_lengths(qtbot, window, gpt2_dir):
    load_model(qtbot, window, gpt2_dir)
    lm_pieces = None
    pairs = [PAIRS[0], PairText(PAIRS[1].clean, PAIRS[1].corrupted, " Alicebobcarol", " Bob"),
             PairText(PAIRS[1].clean, PAIRS[1].clean + " and then", " Alice", " Bob")]
    _set(window, pairs)
    table = child(window, "datasetTable", QTableWidget)
    qtbot.waitUntil(lambda: window.dataset_ctl.checks is not None, timeout=20_000)
    flags = [table.item(r, 4) for r in range(3)]
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
    table = child(window, "datasetTable", QTableWidget)
    assert _rows(table)[5] == [expected[5].clean, expected[5].corrupted, expected[5].answer, expected[5].wrong_answer]
    window.undo_stack.undo()
    assert table.rowCount() == 0


def test_template_dialog_shows_a_bad_setting_and_stays_open(qtbot, window):
    dialog = window.open_template_dialog()
    combo = child(dialog, "templateFamilyCombo", QComboBox)
    combo.setCurrentIndex(combo.findData("ioi"))
    child(dialog, "templateNamesEdit", QLineEdit).setText("Ann, Ben")
    qtbot.mouseClick(child(dialog, "templateGenerateButton"), Qt.LeftButton)
    assert "at least 5 different names" in child(dialog, "templateErrorLabel").text()
    assert dialog.isVisible() and window.undo_stack.undo_text() == ""
