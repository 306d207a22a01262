"""Bad input on the command line: exit 2 with exactly one `error:` line on stderr and no traceback."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import CLEAN, CORRUPTED, REPO_ROOT, error_lines, write_json

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


# ---- hostile and careless input (issue 16) ------------------------------------------------------------------

def _small_project(path, name="resid"):
    from desktop_app.engine.results import AnalysisResult
    from desktop_app.project.document import Project
    from desktop_app.project.iwb import save_project
    from desktop_app.project.specs import ActivationPatchingSpec, Prompts

    p = Project(prompts=Prompts("When Mary and John"))
    p.add_analysis(ActivationPatchingSpec(name))
    p.set_result(name, AnalysisResult(name, "activation_patching", {}, ["layer"], np.arange(3.0)))
    return save_project(p, path)


def test_an_output_that_is_the_input_is_refused(capsys, tmp_path, monkeypatch):
    exp = tmp_path / "e.json"
    exp.write_text("{}", encoding="utf-8")
    project = _small_project(tmp_path / "p.iwb")
    before = project.read_bytes()
    _one_error(capsys, ["run", str(exp), "--out", str(exp)], "experiment file", "choose another --out")
    _one_error(capsys, ["export", str(project), "--analysis", "resid", "--format", "csv", "--out", str(project)],
               "project file")
    (tmp_path / "link.iwb").symlink_to(project)
    _one_error(capsys, ["export", str(project), "--analysis", "resid", "--format", "npz",
                        "--out", str(tmp_path / "link.iwb")], "project file")
    os.link(project, tmp_path / "hard.iwb")
    _one_error(capsys, ["export", str(tmp_path / "hard.iwb"), "--analysis", "resid", "--format", "csv",
                        "--out", str(project)], "project file")
    monkeypatch.chdir(tmp_path)
    _one_error(capsys, ["export", "./p.iwb", "--analysis", "resid", "--format", "csv", "--out", str(project)],
               "project file")
    _one_error(capsys, ["run", str(exp), "--out", "./e.json"], "experiment file")
    assert project.read_bytes() == before and exp.read_text() == "{}"


def test_out_may_not_be_the_dataset_file_the_prompts_name(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH])
    pairs = exp.parent / "pairs.jsonl"
    pair = {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Mary", "wrong_answer": " John"}
    pairs.write_text(json.dumps(pair) + "\n", encoding="utf-8")
    data = json.loads(exp.read_text())
    data["prompts"] = {"dataset": "pairs.jsonl"}  # relative to the experiment file
    write_json(exp, data)
    before = pairs.read_bytes()
    _one_error(capsys, ["run", str(exp), "--out", str(pairs), "-q"], "the dataset file")
    assert pairs.read_bytes() == before


def test_an_unwritable_out_is_found_before_the_run(capsys, tmp_path, make_experiment, monkeypatch):
    from desktop_app.project import execute, safe_output

    exp = make_experiment([PATCH])
    real_open = safe_output.os.open

    def no_writes(path, *args, **kwargs):
        if "probe" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(safe_output.os, "open", no_writes)
    monkeypatch.setattr(execute, "run_experiment", lambda *a, **k: pytest.fail("the run started"))
    _one_error(capsys, ["run", str(exp), "--out", str(tmp_path / "p.iwb")], "not writable", "p.iwb")


def test_long_out_names_work(capsys, tmp_path):
    from desktop_app.project.atomic import name_max

    project = _small_project(tmp_path / "p.iwb")
    out = tmp_path / ("x" * (name_max(tmp_path) - 4) + ".csv")
    assert main(["export", str(project), "--analysis", "resid", "--out", str(out)]) == 0
    assert out.read_text().startswith("layer,")
    _one_error(capsys, ["export", str(project), "--analysis", "resid", "--format", "csv",
                        "--out", str(tmp_path / ("y" * 300 + ".csv"))], "longer than")


def test_a_failing_final_save_keeps_the_results_in_a_recovery_file(capsys, tmp_path, make_experiment, monkeypatch):
    from desktop_app.project import iwb

    monkeypatch.setenv("INTERP_WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    exp = make_experiment([PATCH])
    out = tmp_path / "p.iwb"
    real = iwb.save_project

    def failing(project, path, **kwargs):
        if str(path) == str(out):
            raise OSError(28, "No space left on device")  # not even a WorkbenchError: anything may fail
        return real(project, path, **kwargs)

    monkeypatch.setattr(iwb, "save_project", failing)
    line = _one_error(capsys, ["run", str(exp), "--out", str(out), "-q"], "could not save", "saved in")
    recovered = Path(line.rsplit("saved in ", 1)[1].removesuffix(" instead."))
    assert recovered.parent == tmp_path / "data" / "recovered"
    r = load_project(recovered).entry("resid").result
    assert r.status == "complete" and np.isfinite(r.values).all()
    assert not out.exists()


def test_a_prompt_with_a_lone_surrogate_is_saved_escaped(capsys, tmp_path, make_experiment):
    exp = make_experiment([PATCH], clean="When Mary and John went to the store, John gave a drink to \ud800")
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp), "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert any(line.startswith("note:") and "escaped" in line for line in err.splitlines()), err
    assert len(error_lines(err)) == 1 and "U+D800" in error_lines(err)[0]
    project = load_project(out)
    assert project.prompts.clean.endswith("\\ud800")
    assert project.entry("resid").result.status == "failed"


def test_control_characters_are_not_echoed(capsys, tmp_path):
    project = _small_project(tmp_path / "p.iwb", name="evil\x1b]0;pwned\x07\x9b2J")
    line = _one_error(capsys, ["export", str(project), "--analysis", "x\x1b[2J\x07", "--format", "csv",
                               "--out", str(tmp_path / "a.csv")], "no analysis named")
    assert not any(c in line for c in "\x1b\x07\x9b")
    assert main(["info", str(project)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\x9b") and "\\u009b" in out
    json.loads(out)  # still valid JSON


def test_bad_arguments_are_one_line_never_a_traceback(capsys, tmp_path):
    cases = [["run"], ["run", "--out"], ["run", "e.json", "--out", "p.iwb", "--batch-size", "many"],
             ["run", "e.json", "--out", "p.iwb", "--no-such-option"], ["export"],
             ["export", "p.iwb", "--analysis", "a", "--out", "x.png", "--width", "-5"],
             ["export", "p.iwb", "--analysis", "a", "--out", "x.png", "--dpi", "nan"],
             ["export", "p.iwb", "--analysis", "a", "--out", "x.png", "--dpi", "1e999999"],
             ["info"], ["info", "a", "b"], ["frobnicate"], ["--no-such-flag", "x"],
             ["info", "p\x00.iwb"], ["run", "e.json", "--out", "a\x00b.iwb"], ["info", "\udcff.iwb"],
             ["info", str(tmp_path / ("z" * 5000))], [str(tmp_path / ("w" * 5000 + ".iwb"))]]
    for argv in cases:
        _one_error(capsys, argv)
    assert main(["export", "--help"]) == 0
    assert "--analysis" in capsys.readouterr().out


def test_a_closed_pipe_is_quiet(tmp_path):
    from cli_helpers import run_cli

    project = _small_project(tmp_path / "p.iwb")
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time, desktop_app.cli as c; time.sleep(1); "
                             "sys.exit(c.main(sys.argv[1:]))", "info", str(project)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader leaves before the first line (`| head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert err == "", err
    assert run_cli(["info", str(project)]).returncode == 0


def test_an_unexpected_error_is_one_line_with_exit_1(capsys, monkeypatch, tmp_path):
    import desktop_app.cli as cli

    def broken(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_dispatch", lambda argv: broken(argv))
    assert main(["info", "p.iwb"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "internal error" in err
