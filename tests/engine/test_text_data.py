"""Text lists and contrastive pairs read from files: a missing cell is refused, never read as the text 'None'."""
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.engine.text_data import read_pairs, read_texts


def test_pairs_file_with_a_missing_cell_is_refused(tmp_path):
    ok = tmp_path / "pairs.csv"
    ok.write_text("positive,negative\nI love it,I hate it\n")
    assert read_pairs(ok) == (["I love it"], ["I hate it"])
    short = tmp_path / "short.csv"
    short.write_text("positive,negative\nI love it,I hate it\nGreat\n")
    with pytest.raises(SpecError, match="Row 2 of the pairs file has no negative text"):
        read_pairs(short)
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text('{"positive": null, "negative": "bad"}\n')
    with pytest.raises(SpecError, match="Row 1 of the pairs file has no positive text"):
        read_pairs(nulls)


def test_text_list_with_a_null_text_is_refused(tmp_path):
    good = tmp_path / "texts.jsonl"
    good.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_texts(good) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "one"}\n{"text": null}\n')
    with pytest.raises(SpecError, match="Row 2 of the text list .* has no text"):
        read_texts(bad)
