"""`interp-workbench run / info / export` end to end on the tiny trained IOI model."""
import csv
import json
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from cli_helpers import CLEAN, CORRUPTED, error_lines, experiment_dict, has_module, run_cli, write_json

from desktop_app.cli import main
from desktop_app.project.iwb import load_project

HAS_ATTRIBUTION = has_module("desktop_app.engine.attribution")
HAS_FIGURES = has_module("desktop_app.ui.figure") and has_module("PySide6")


def _analyses():
    analyses = [
        {"name": "resid", "kind": "activation_patching", "component": "resid_pre", "positions": "each",
         "direction": "denoise", "metric": "logit_diff_recovered"},
        {"name": "heads", "kind": "activation_patching", "component": "head_out", "positions": "all",
         "direction": "noise", "metric": "logit_diff"},
    ]
    if HAS_ATTRIBUTION:
        analyses.append({"name": "attr", "kind": "attribution_patching", "component": "resid_pre"})
    return analyses


@pytest.fixture(scope="module")
def ran(tmp_path_factory, ioi_gpt2_dir):
    """One `run` shared by the tests of this module: (experiment path, project path, exit code)."""
    root = tmp_path_factory.mktemp("cli_run")
    (root / "exp").mkdir()
    exp = write_json(root / "exp" / "ioi.json",
                     experiment_dict(os.path.relpath(ioi_gpt2_dir, root / "exp"), _analyses()))
    out = root / "ioi.iwb"
    code = main(["run", str(exp), "--out", str(out), "--quiet"])
    return exp, out, code


def test_run_writes_a_project_the_window_can_open(ran, ioi_gpt2_dir):
    exp, out, code = ran
    assert code == 0
    project = load_project(out)
    assert project.names() == [a["name"] for a in _analyses()]
    assert os.path.samefile(project.model.path, ioi_gpt2_dir)  # relative path resolved against the file
    assert project.model.config_hash and project.model.dtype == "float32"
    assert project.prompts.clean == CLEAN and project.prompts.answer == " Mary"
    for entry in project.analyses:
        assert entry.result is not None and entry.result.status == "complete"
        assert entry.result_spec == entry.spec
        assert np.isfinite(entry.result.values).all()


def test_resid_patching_has_the_known_structure(ran):
    """Denoising resid_pre at layer 0 restores exactly the clean behaviour at the one position where the
    prompts differ (recovered = 1) and changes nothing anywhere else (recovered = 0)."""
    r = load_project(ran[1]).entry("resid").result
    assert r.dims == ["layer", "position"]
    clean, corrupted = np.asarray(r.tokens_clean), np.asarray(r.tokens_corrupted)
    differ = np.flatnonzero(clean != corrupted)
    assert len(differ) == 1 and r.values.shape == (2, len(clean))
    row0 = r.values[0]
    np.testing.assert_allclose(row0[differ[0]], 1.0, atol=1e-4)
    np.testing.assert_allclose(np.delete(row0, differ[0]), 0.0, atol=1e-4)
    assert r.clean_metric == pytest.approx(1.0) and r.corrupted_metric == pytest.approx(0.0)
    assert r.labels["position"][differ[0]].endswith("John")


def test_info_prints_the_summary(ran, capsys):
    _, out, _ = ran
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    project = load_project(out)
    assert info["model"]["path"] == project.model.path
    assert info["prompts"] == {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Mary", "wrong_answer": " John"}
    by_name = {a["name"]: a for a in info["analyses"]}
    assert list(by_name) == project.names()
    assert by_name["resid"]["kind"] == "activation_patching"
    assert by_name["resid"]["status"] == "complete"
    assert by_name["resid"]["dims"] == ["layer", "position"]
    assert by_name["resid"]["shape"] == [2, len(project.entry("resid").result.tokens_clean)]
    assert by_name["heads"]["dims"] == ["layer", "head"] and by_name["heads"]["shape"] == [2, 4]


def test_export_csv_reads_back_equal(ran, tmp_path):
    _, out, _ = ran
    target = tmp_path / "resid.csv"
    assert main(["export", str(out), "--analysis", "resid", "--format", "csv", "--out", str(target)]) == 0
    r = load_project(out).entry("resid").result
    with open(target, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r.values.size
    back = np.full(r.values.shape, np.inf)
    for row in rows:
        layer, pos = int(row["layer"]), int(row["position"])
        back[layer, pos] = float(row["value"])
        assert row["position_label"] == r.labels["position"][pos]
    np.testing.assert_array_equal(back, r.values.astype(np.float64))


def test_export_npz_reads_back_equal(ran, tmp_path):
    _, out, _ = ran
    target = tmp_path / "heads.npz"
    assert main(["export", str(out), "--analysis", "heads", "--format", "npz", "--out", str(target)]) == 0
    r = load_project(out).entry("heads").result
    with np.load(target, allow_pickle=False) as z:
        np.testing.assert_array_equal(z["values"], r.values)
        np.testing.assert_array_equal(z["tokens_clean"], r.tokens_clean)
        np.testing.assert_array_equal(z["tokens_corrupted"], r.tokens_corrupted)
        assert list(z["labels_layer"]) == ["0", "1"] and list(z["labels_head"]) == ["0", "1", "2", "3"]
        assert float(z["clean_metric"]) == pytest.approx(r.clean_metric)
        assert float(z["elapsed_s"]) > 0


def test_export_format_from_extension(ran, tmp_path):
    target = tmp_path / "resid.npz"
    assert main(["export", str(ran[1]), "--analysis", "resid", "--out", str(target)]) == 0
    with np.load(target, allow_pickle=False) as z:
        assert z["values"].shape == load_project(ran[1]).entry("resid").result.shape


@pytest.mark.skipif(not HAS_FIGURES, reason="desktop_app.ui.figure is not available")
def test_export_figures(ran, tmp_path):
    from PySide6.QtGui import QImage

    _, out, _ = ran
    png, svg, pdf = tmp_path / "f.png", tmp_path / "f.svg", tmp_path / "f.pdf"
    for fmt, path in (("png", png), ("svg", svg), ("pdf", pdf)):
        assert main(["export", str(out), "--analysis", "resid", "--format", fmt, "--out", str(path),
                     "--width", "800", "--height", "500", "--dpi", "100"]) == 0, fmt
    img = QImage(str(png))
    assert not img.isNull() and img.width() == 800 and img.height() == 500
    colours = {img.pixel(x, y) for x in range(0, 800, 7) for y in range(0, 500, 7)}
    assert len(colours) > 10  # a heatmap and text, not a blank page
    root = ET.parse(svg).getroot()
    texts = " ".join(t for el in root.iter() if el.tag.endswith("text") for t in el.itertext())
    assert "layer" in texts and "position" in texts
    assert pdf.read_bytes().startswith(b"%PDF")


def test_python_m_desktop_app_run(tmp_path, ioi_gpt2_dir):
    """The real entry point in a subprocess: exit code 0, progress lines on stderr, then exit 2 with one
    error line for a project that names an analysis the file lacks."""
    exp = write_json(tmp_path / "exp.json", experiment_dict(ioi_gpt2_dir, _analyses()[:1]))
    out = tmp_path / "p.iwb"
    done = run_cli(["run", str(exp), "--out", str(out)])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "[1/1] resid (activation_patching)" in done.stderr
    assert f"/{load_project(out).entry('resid').result.values.size} cells" in done.stderr
    assert done.stdout == ""
    bad = run_cli(["export", str(out), "--analysis", "nope", "--format", "csv", "--out", str(tmp_path / "x.csv")])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == error_lines(bad.stderr) and len(error_lines(bad.stderr)) == 1
    assert "its analyses are resid" in bad.stderr and "Traceback" not in bad.stderr


def test_info_reports_the_conformance_checks(ran, capsys):
    _, out, _ = ran
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    conf = json.loads(capsys.readouterr().out)["model"]["conformance"]
    assert conf["family"] == "gpt2" and conf["total_ms"] > 0
    assert set(conf["checks"]) == {"decomposition", "block_form", "unembed", "restart", "prefix_restart", "hook_z"}
    for name, check in conf["checks"].items():
        assert check["passed"] is True and check["tolerance"] > 0, name
    assert conf["checks"]["decomposition"]["max_abs_diff"] <= conf["checks"]["decomposition"]["tolerance"]
