"""Pair datasets: CSV / JSONL files read as a stream, one sentence per bad input, checks against a model, and
the memory bound of a 100,000-pair file."""
import json
import subprocess
import sys
import textwrap

import pytest

from desktop_app.engine.datasets import (PairDataset, PairText, dataset_from_list, read_pair_file, scan_pair_file,
                                         tokenize_dataset, write_pair_file)
from desktop_app.engine.errors import PromptError, SpecError
from desktop_app.engine.jobs import Progress, drive
from desktop_app.engine.templates import ioi_pairs

HEADER = "clean,corrupted,answer,wrong_answer\n"
ROW = "When Mary and John went to the store,When Mary and John went to the park, Mary, John\n"


def write(tmp_path, name, text, mode="w"):
    p = tmp_path / name
    if mode == "wb":
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return p


def test_csv_and_jsonl_round_trip_with_answer_lists_and_positions(tmp_path):
    data = ioi_pairs(5, seed=1)
    data.pairs.append(PairText("The war lasted from 1732 to 17", "The war lasted from 1701 to 17", ("33", "34"),
                               ("31", "32")))
    for name in ("pairs.csv", "pairs.jsonl"):
        back = read_pair_file(write_pair_file(data, tmp_path / name))
        assert [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in back.pairs] == \
               [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in data.pairs]
        if name.endswith(".jsonl"):
            assert back.pairs[0].spans == data.pairs[0].spans


def test_csv_with_quoted_commas_and_columns_in_any_order(tmp_path):
    p = write(tmp_path, "p.csv", 'answer,clean,wrong_answer,corrupted\n Mary,"A, B and C", John,"A, B and D"\n')
    (pair,) = read_pair_file(p).pairs
    assert (pair.clean, pair.corrupted, pair.answer, pair.wrong_answer) == ("A, B and C", "A, B and D", " Mary", " John")


@pytest.mark.parametrize("name,content,words", [
    ("p.csv", "clean,corrupted,answer\n" + "a,b,c\n", "has no column 'wrong_answer'"),
    ("p.csv", HEADER + ROW + "\n" + ROW.replace("park", "beach"), "line 3 is an empty row"),
    ("p.csv", HEADER + ROW + ROW, "lines 2 and 3 hold the same pair"),
    ("p.csv", HEADER + "a,b,, John\n", "line 2: the 'answer' field is empty"),
    ("p.csv", HEADER + "a,b,c\n", "line 2 has 3 fields but the header has 4"),
    ("p.csv", "", "is empty"),
    ("p.csv", HEADER + '"' + "a" * 200_000 + '",b,c,d\n', "line 2 cannot be read as CSV (field larger than"),
    ("p.csv", HEADER, "holds no pairs"),
    ("p.jsonl", '{"clean": "a", "corrupted": "b", "answer": " x", "wrong_answer": " y"}\n{"clean": "a"',
     "line 2 is not valid JSON"),
    ("p.jsonl", '{"clean": "a", "corrupted": "b", "answer": " x"}\n', "has no field 'wrong_answer'"),
    ("p.txt", "x", "must end in .csv or .jsonl"),
])
def test_bad_files_get_one_sentence(tmp_path, name, content, words):
    p = write(tmp_path, name, content)
    with pytest.raises(SpecError) as err:
        read_pair_file(p)
    assert words in str(err.value) and "\n" not in str(err.value)
    if name.endswith((".csv", ".jsonl")) and content:
        with pytest.raises(SpecError):
            drive(scan_pair_file(p))


def test_non_utf8_line_is_named(tmp_path):
    p = write(tmp_path, "p.csv", (HEADER + ROW).encode() + b"caf\xe9,b,c,d\n", mode="wb")
    with pytest.raises(SpecError, match="line 3 is not UTF-8 text"):
        read_pair_file(p)


def test_trailing_blank_lines_are_fine(tmp_path):
    assert len(read_pair_file(write(tmp_path, "p.csv", HEADER + ROW + "\n\n"))) == 1


def test_list_dataset_duplicates_and_missing_fields():
    item = dict(clean="a b", corrupted="a c", answer=" x", wrong_answer=" y")
    with pytest.raises(SpecError, match=r"prompts\[0\] and prompts\[1\] are the same pair"):
        dataset_from_list([item, dict(item)])
    with pytest.raises(SpecError, match=r"prompts\[0\] has no field 'corrupted'"):
        dataset_from_list([dict(clean="a", answer=" x")])
    with pytest.raises(SpecError, match="non-empty list"):
        dataset_from_list([])


def test_against_a_model_multi_token_answers_and_lengths(lm_gpt2):
    ok = dict(clean="When Mary and John went to the store, John gave a drink to",
              corrupted="When Mary and John went to the store, Mary gave a drink to", answer=" Mary",
              wrong_answer=" John")
    data = tokenize_dataset(lm_gpt2, dataset_from_list([ok]))
    assert data.aligned and data.pairs[0].answer_ids == (lm_gpt2.single_token_id(" Mary"),)
    with pytest.raises(PromptError) as err:
        tokenize_dataset(lm_gpt2, dataset_from_list([ok, {**ok, "answer": " Maryzzz"}]))
    assert "pair 1: the answer ' Maryzzz' is" in str(err.value) and " | " in str(err.value)
    with pytest.raises(PromptError) as err:
        tokenize_dataset(lm_gpt2, dataset_from_list([{**ok, "corrupted": ok["corrupted"] + " the store"}]))
    msg = str(err.value)
    assert "no position names align them" in msg and "clean: " in msg and "corrupted: " in msg
    lists = tokenize_dataset(lm_gpt2, dataset_from_list([{**ok, "answer": [" Mary", " Alice"]}]))
    assert len(lists.pairs[0].answer_ids) == 2


def test_named_positions_map_to_tokens(lm_gpt2):
    data = ioi_pairs(8, seed=2)
    tok = tokenize_dataset(lm_gpt2, data)
    assert tok.position_names == ["IO", "S1", "S2", "END"]
    for text, pair in zip(data.pairs, tok.pairs):
        io = text.answer
        c_io, k_io = pair.positions["IO"]
        assert pair.clean.strings[c_io] == io
        assert pair.clean.strings[pair.positions["S2"][0]] == text.wrong_answer
        assert pair.positions["END"] == (len(pair.clean.ids) - 1, len(pair.corrupted.ids) - 1)
        assert pair.corrupted.strings[k_io] != io


def test_100k_pair_file_streams_within_the_memory_bound(tmp_path):
    """Checking a 100,000-pair CSV (~15 MB) keeps only a digest per pair: peak RSS grows by < 40 MB. Reading it
    into a PairDataset (one compact object per pair) grows by < 150 MB. Measured in a fresh process."""
    code = textwrap.dedent(f"""
        import csv, json, resource, time
        from desktop_app.engine.datasets import read_pair_file, scan_pair_file
        from desktop_app.engine.jobs import Progress, drive
        from desktop_app.engine.templates import ioi_pairs
        base = ioi_pairs(500, seed=1).pairs
        path = {str(tmp_path / 'big.csv')!r}
        with open(path, 'w', newline='', encoding='utf-8') as fh:
            w = csv.writer(fh)
            w.writerow(['clean', 'corrupted', 'answer', 'wrong_answer'])
            for i in range(100_000):
                q = base[i % 500]
                w.writerow([q.clean + ' #' + str(i), q.corrupted, q.answer, q.wrong_answer])
        rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        before = rss()
        events = []
        n = drive(scan_pair_file(path), events.append)
        scanned = rss() - before
        fractions = [e.done / e.total for e in events if isinstance(e, Progress)]
        read = len(read_pair_file(path))
        print(json.dumps(dict(n=n, scan_mb=scanned, read_mb=rss() - before, read=read, fractions=fractions)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == got["read"] == 100_000
    assert got["scan_mb"] < 40, got
    assert got["read_mb"] < 150, got
    assert len(got["fractions"]) >= 10 and got["fractions"] == sorted(got["fractions"]) and got["fractions"][-1] == 1


def test_dataset_positions_must_agree():
    a, b = ioi_pairs(2, seed=0).pairs
    with pytest.raises(SpecError, match="every pair must name the same positions"):
        PairDataset([a, PairText(b.clean, b.corrupted, b.answer, b.wrong_answer)]).position_names()
