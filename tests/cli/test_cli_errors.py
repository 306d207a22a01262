"""Bad input on the command line: exit 2 with exactly one `error:` line on stderr and no traceback."""
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import REPO_ROOT, error_lines

from desktop_app.cli import ProgressReport, main
from desktop_app.engine.jobs import Progress
from desktop_app.project.execute import StepFinished, StepStarted
from desktop_app.project.iwb import load_project

PATCH = {"name": "resid", "kind": "activation_patching", "component": "resid_pre"}


def _one_error(capsys, argv, *needles) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines == error_lines(err) and len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_missing_experiment_file(capsys, tmp_path):
    _one_error(capsys, ["run", str(tmp_path / "nope.json"), "--out", str(tmp_path / "p.iwb")],
               "nope.json", "does not exist")


def test_json_syntax_error_names_line_and_column(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "version": 1,\n  "model": {"path": "m",}\n}\n', encoding="utf-8")
    _one_error(capsys, ["run", str(bad), "--out", str(tmp_path / "p.iwb")], "line 3", "column")


def test_unknown_kind(capsys, tmp_path, make_experiment):
    exp = make_experiment([{"name": "x", "kind": "telepathy"}])
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "p.iwb")], "telepathy", "activation_patching")


def test_missing_field(capsys, tmp_path, make_experiment):
    exp = make_experiment([{"name": "trace", "kind": "causal_tracing"}])
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "p.iwb")], "subject")


def test_model_path_that_does_not_exist(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH])
    data = json.loads(exp.read_text())
    data["model"]["path"] = "no-such-folder"
    exp.write_text(json.dumps(data))
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "p.iwb"), "-q"], "no-such-folder")
    assert not (tmp_path / "p.iwb").exists()


def test_prompts_of_different_lengths(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH], corrupted="When Mary and John went to the big store, Mary gave a drink to")
    out = tmp_path / "p.iwb"
    _one_error(capsys, ["run", str(exp), "--out", str(out), "-q"], "resid", "same length", "·store")
    r = load_project(out).entry("resid").result  # the project keeps the spec and the reason
    assert r.status == "failed" and "same length" in r.message


def test_a_failing_analysis_keeps_the_finished_ones(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH, {"name": "feat", "kind": "sae_features", "sae": "sae-folder"},
                           {"name": "late", "kind": "activation_patching", "component": "mlp_out"}])
    out = tmp_path / "p.iwb"
    _one_error(capsys, ["run", str(exp), "--out", str(out), "-q"], "'feat'", str(out))
    project = load_project(out)
    assert project.entry("resid").result.status == "complete"
    assert project.entry("late").result.status == "complete"
    assert np.isfinite(project.entry("late").result.values).all()
    failed = project.entry("feat").result
    assert failed.status == "failed" and failed.message
    _one_error(capsys, ["export", str(out), "--analysis", "feat", "--format", "csv",
                        "--out", str(tmp_path / "f.csv")], "failed")


def test_unknown_analysis_in_export_lists_the_names(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH, {**PATCH, "name": "mlp", "component": "mlp_out"}])
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 0
    _one_error(capsys, ["export", str(out), "--analysis", "attn", "--format", "csv",
                        "--out", str(tmp_path / "a.csv")], "'attn'", "resid, mlp")


def test_output_folder_missing(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH])
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "nowhere" / "p.iwb")], "nowhere", "does not exist")
    _one_error(capsys, ["export", str(tmp_path / "p.iwb"), "--analysis", "resid", "--format", "csv",
                        "--out", str(tmp_path / "nowhere" / "a.csv")], "nowhere")


def test_argument_errors_are_one_line(capsys, tmp_path):
    _one_error(capsys, ["run", str(tmp_path / "e.json")], "--out")
    _one_error(capsys, ["export", "p.iwb", "--analysis", "a", "--format", "gif", "--out", "x"], "gif")
    _one_error(capsys, ["run", "e.json", "--out", "p.iwb", "--batch-size", "0"], "batch-size")
    _one_error(capsys, ["info", str(tmp_path / "missing.iwb")], "missing.iwb")
    _one_error(capsys, ["export", str(tmp_path / "p.iwb"), "--analysis", "a", "--out", str(tmp_path / "a.txt")],
               "--format")
    _one_error(capsys, [str(tmp_path / "exp.json")], "run")  # an experiment given where a project belongs


def test_bad_device_override(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH])
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "p.iwb"), "--device", "tpu"], "device")


def test_version_and_help(capsys):
    from desktop_app import __version__

    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out
    assert main(["run", "--help"]) == 0
    assert "--out" in capsys.readouterr().out


def test_cli_and_execute_do_not_import_torch_or_qt():
    code = ("import sys; import desktop_app.cli, desktop_app.project.execute; "
            "bad = [m for m in ('torch', 'PySide6', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True, timeout=60)


class _Stream:
    def __init__(self, tty):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty

    def fileno(self):
        raise OSError("no file")


def _feed(report, total=100):
    report(StepStarted(1, 2, "resid", "activation_patching"))
    report(Progress(0, total, "recording"))
    for done in range(10, total + 1, 10):
        report(Progress(done, total, f"layer {done // 50}"))
    report(StepFinished(1, 2, "resid", None))


def test_progress_bar_on_a_terminal_redraws_one_line():
    stream = _Stream(tty=True)
    report = ProgressReport(stream)
    report.interval = 0.0
    _feed(report)
    assert "\r" in stream.text and "cells/s" in stream.text and "ETA" in stream.text
    assert "100/100 cells (100%)" in stream.text
    assert stream.text.count("\n") == 2  # the step header, then one newline ending the bar


def test_progress_lines_in_a_pipe_are_plain_and_throttled():
    stream = _Stream(tty=False)
    report = ProgressReport(stream)
    report.interval = 3600.0  # only the first cells and the final line get through
    _feed(report)
    lines = stream.text.splitlines()
    assert "\r" not in stream.text
    assert lines[0] == "[1/1] resid (activation_patching)"
    assert [line.split("|")[2].split()[0] for line in lines[1:]] == ["0/100", "10/100", "100/100"]


@pytest.mark.parametrize("missing", ["desktop_app.ui.app", "desktop_app.bench"])
def test_window_or_bench_missing_is_an_error_line(capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # import of it raises ModuleNotFoundError
    argv = [] if missing.endswith("app") else ["bench"]
    _one_error(capsys, argv, "not")
