"""`interp-workbench run / info / export` with a dataset file of pairs and a written metric."""
import csv
import json

import numpy as np
from cli_helpers import error_lines, experiment_dict, run_cli, write_json

from desktop_app.cli import main
from desktop_app.engine.datasets import write_pair_file
from desktop_app.engine.templates import ioi_pairs


def test_run_info_and_export_a_dataset(tmp_path, ioi_gpt2_dir, capsys):
    write_pair_file(ioi_pairs(4, seed=0), tmp_path / "pairs.jsonl")
    exp = experiment_dict(ioi_gpt2_dir, [
        {"name": "named", "kind": "activation_patching", "component": "resid_pre", "positions": "named",
         "metric": {"expression": "logit(answer) - logit(wrong)"}}])
    exp["prompts"] = {"dataset": "pairs.jsonl"}
    path = write_json(tmp_path / "exp.json", exp)
    out = tmp_path / "p.iwb"
    assert main(["run", str(path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["prompts"]["pairs"] == 4 and info["prompts"]["source"] == "pairs.jsonl"
    (a,) = info["analyses"]
    assert a["status"] == "complete" and a["pairs"] == 4 and a["dims"] == ["layer", "position"]
    assert main(["export", str(out), "--analysis", "named", "--format", "npz", "--out", str(tmp_path / "r.npz")]) == 0
    with np.load(tmp_path / "r.npz", allow_pickle=False) as z:
        assert z["values_per_pair"].shape == (4,) + z["values"].shape and z["sem"].shape == z["values"].shape
        assert list(z["labels_position"]) == ["IO", "S1", "S2", "END"]
        np.testing.assert_allclose(z["values_per_pair"].mean(0), z["values"], atol=1e-5)
    assert main(["export", str(out), "--analysis", "named", "--format", "csv", "--out", str(tmp_path / "r.csv")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "r.csv", encoding="utf-8")))
    assert {r["pair"] for r in rows} == {"mean", "0", "1", "2", "3"}


def test_bad_dataset_file_is_one_error_line(tmp_path, ioi_gpt2_dir):
    (tmp_path / "pairs.csv").write_bytes(b"clean,corrupted,answer\na,b,c\n")
    exp = experiment_dict(ioi_gpt2_dir, [{"name": "r", "kind": "activation_patching"}])
    exp["prompts"] = {"dataset": "pairs.csv"}
    proc = run_cli(["run", str(write_json(tmp_path / "e.json", exp)), "--out", str(tmp_path / "o.iwb")])
    assert proc.returncode == 2
    assert error_lines(proc.stderr) == ["error: pairs.csv has no column 'wrong_answer'; the header must be "
                                        "clean,corrupted,answer,wrong_answer."]
    assert "Traceback" not in proc.stderr


def test_reading_a_big_dataset_file_reports_progress_with_time_left(tmp_path, ioi_gpt2_dir):
    pairs = ioi_pairs(4, seed=0).pairs
    with open(tmp_path / "big.csv", "w", encoding="utf-8", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clean", "corrupted", "answer", "wrong_answer"])
        for i in range(20_000):  # distinct pairs: a number in each prompt
            p = pairs[i % 4]
            w.writerow([f"{i} {p.clean}", f"{i} {p.corrupted}", p.answer, p.wrong_answer])
    exp = experiment_dict(ioi_gpt2_dir, [{"name": "r", "kind": "activation_patching", "component": "resid_pre",
                                          "layers": [0]}])
    exp["prompts"] = {"dataset": "big.csv"}
    path = write_json(tmp_path / "exp.json", exp)
    from desktop_app.cli import ProgressReport
    from desktop_app.project.experiment import load_experiment

    class Pipe:
        text = ""

        def write(self, s):
            self.text += s

        def flush(self):
            pass

        def isatty(self):
            return False

    stream = Pipe()
    report = ProgressReport(stream)
    report.interval = 0.0
    experiment = load_experiment(path, progress=report)
    assert len(experiment.prompts.pairs) == 20_000
    lines = stream.text.splitlines()
    assert len(lines) == 5 and all("reading big.csv" in x or "read big.csv" in x for x in lines), lines
    assert all("ETA" in x and "MB/s" in x for x in lines[1:]) and "100%" in lines[-1] and "20000 pairs" in lines[-1]
    assert "cells" not in stream.text
