"""The analysis-kind registry: every kind is one record that the spec reader, execute, the project file, the CLI
and the export look up. A kind registered from a test (one module's worth of code) goes through all of them."""
import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest

from desktop_app.engine.errors import SpecError
from desktop_app.engine.jobs import Progress
from desktop_app.engine.results import AnalysisResult
from desktop_app.project import kinds
from desktop_app.project.specs import AnalysisSpec, ANALYSIS_KINDS, analysis_from_dict, panel_fields, param

from iwb_testkit import all_specs

ROOT = Path(__file__).resolve().parents[2]


def test_every_builtin_kind_is_a_complete_record():
    records = {r.kind: r for r in kinds.all_kinds()}
    assert {"activation_patching", "attribution_patching", "causal_tracing", "ablation",
            "sae_features"} <= set(records)
    for record in records.values():
        assert ANALYSIS_KINDS[record.kind] is record.spec and record.spec.kind == record.kind
        assert callable(record.job) and record.dims and record.label
        assert record.view in kinds.VIEW_TYPES and record.click in kinds.CLICK_TYPES
        fields = panel_fields(record.spec)
        # every field an experiment file accepts (all but the name) has panel metadata
        assert {f.name for f in fields} == {f.name for f in dataclasses.fields(record.spec)} - {"name"}
        for f in fields:
            assert f.metadata["tip"], (record.kind, f.name)


def test_value_names_and_scales_come_from_the_record():
    r = AnalysisResult("t", "causal_tracing", {}, ["layer"], np.zeros(2))
    assert kinds.value_label(r) == "answer probability" and kinds.scale_of(r) == "sequential"
    r = AnalysisResult("p", "activation_patching", {"metric": "kl_div"}, ["layer"], np.zeros(2))
    assert kinds.value_label(r) == "kl_div" and kinds.scale_of(r) == "diverging"
    r = AnalysisResult("x", "from_a_newer_version", {}, ["layer"], np.zeros(2))
    assert kinds.value_label(r) == "value" and kinds.find("from_a_newer_version") is None
    with pytest.raises(SpecError, match="from_a_newer_version"):
        kinds.get("from_a_newer_version")


def test_generic_field_checks_from_metadata():
    @dataclasses.dataclass(frozen=True)
    class Checked(AnalysisSpec):
        mode: str = param("a", widget="choice", choices=("a", "b"), tip="t")
        k: int = param(3, widget="int", minimum=1, maximum=5, tip="t")
        scale: float = param(1, widget="float", minimum=0.0, tip="t")
        texts: tuple = param((), widget="text_list", tip="t")
        layers: tuple | None = param(None, widget="layers", tip="t")

    assert Checked("c", scale=2).scale == 2.0 and isinstance(Checked("c", scale=2).scale, float)
    assert Checked("c", texts=["x", "y"], layers=[0, 2]).texts == ("x", "y")
    for bad, field in (({"mode": "c"}, "mode"), ({"k": 0}, "k"), ({"k": 6}, "k"), ({"k": "3"}, "k"),
                       ({"scale": -1}, "scale"), ({"texts": "x"}, "texts"), ({"texts": [""]}, "texts"),
                       ({"layers": [-1]}, "layers")):
        with pytest.raises(SpecError, match=f"'{field}'"):
            Checked("c", **bad)
    with pytest.raises(ValueError):
        param(1, widget="slider")


def test_no_module_outside_the_registry_branches_on_a_kind_name():
    """execute, the project file, the CLI, the export and the window look kinds up; no if/elif over kinds."""
    names = "activation_patching|attribution_patching|causal_tracing|sae_features|ablation"
    branch = re.compile(rf'(==|!=)\s*"({names})"|"({names})"\s*:|\bin\s*\([^)]*"({names})"|get\("({names})"')
    files = [ROOT / "desktop_app" / p for p in ("project/execute.py", "project/iwb.py", "project/data_export.py",
                                                "project/experiment.py", "cli.py", "ui/analysis_controller.py",
                                                "ui/panels.py", "ui/plots.py", "ui/figure_data.py", "ui/figure.py",
                                                "ui/worker_jobs.py")]
    for path in files:
        text = path.read_text()
        code = re.sub(r'""".*?"""', "", text, flags=re.S)  # docstrings may name kinds
        hits = [m.group(0) for m in branch.finditer(code)]
        assert not hits, f"{path.name} branches on kinds: {hits}"


# ---- a new kind, registered the way a new module would ---------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TokenIdsSpec(AnalysisSpec):
    prompt: str = param("clean", widget="choice", choices=("clean", "corrupted"), editable=True, tip="which text")
    scale: float = param(1.0, widget="float", minimum=0.0, tip="multiplies the ids")


def _token_ids_job(lm, prompts, spec, cancel, batch_size):
    text = kinds.prompt_text(prompts, spec.prompt)
    info = lm.tokenize(text, prompts.prepend_bos)

    def job():
        yield Progress(0, 1, "reading tokens")
        values = np.asarray(info.ids, dtype=np.float32) * spec.scale
        yield Progress(1, 1, "done")
        return AnalysisResult(spec.name, spec.kind, kinds.field_values(spec), ["position"], values,
                              labels={"position": info.labels()}, tokens_clean=np.asarray(info.ids),
                              extras={"squared": values ** 2})
    return job()


def _write_json(result, path):
    Path(path).write_text(json.dumps({"values": np.asarray(result.values).tolist()}))
    return path


@pytest.fixture
def token_ids_kind():
    record = kinds.register_kind(kinds.AnalysisKind(
        kind="token_ids_test", label="Token ids (test)", spec=TokenIdsSpec, job=_token_ids_job, dims="[position]",
        value_name="token id", scale="sequential", view="token_strip", click="describe",
        exports=(kinds.ExportFormat("tokjson", _write_json, "the ids as JSON"),)))
    yield record
    kinds._unregister("token_ids_test")


def test_a_registered_kind_runs_saves_reloads_and_exports(token_ids_kind, gpt2_dir, tmp_path, capsys):
    from desktop_app.cli import main
    from desktop_app.engine.loading import load_model
    from desktop_app.project.experiment import load_experiment

    exp_path = tmp_path / "exp.json"
    exp_path.write_text(json.dumps({
        "version": 1, "model": {"path": str(gpt2_dir), "dtype": "float32", "device": "cpu"},
        "prompts": {"clean": "When Mary and John went", "corrupted": "When John and Mary went"},
        "analyses": [{"name": "ids", "kind": "token_ids_test", "prompt": "corrupted", "scale": 2.0}]}))
    spec = load_experiment(exp_path).analyses[0]
    assert isinstance(spec, TokenIdsSpec) and spec.scale == 2.0
    out = tmp_path / "p.iwb"
    assert main(["run", str(exp_path), "--out", str(out), "-q"]) == 0
    expected = 2.0 * np.asarray(load_model(str(gpt2_dir), dtype="float32", device="cpu")
                                .tokenize("When John and Mary went").ids, dtype=np.float32)

    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["analyses"][0]["kind"] == "token_ids_test" and info["analyses"][0]["status"] == "complete"
    assert info["analyses"][0]["parameters"] == {"prompt": "corrupted", "scale": 2.0}

    assert main(["export", str(out), "--analysis", "ids", "--format", "tokjson", "--out", str(tmp_path / "a.j")]) == 0
    np.testing.assert_array_equal(json.loads((tmp_path / "a.j").read_text())["values"], expected)
    assert main(["export", str(out), "--analysis", "ids", "--out", str(tmp_path / "a.npz")]) == 0
    with np.load(tmp_path / "a.npz", allow_pickle=False) as z:
        np.testing.assert_array_equal(z["values"], expected)
        np.testing.assert_array_equal(z["squared"], expected ** 2)


def test_an_extra_format_of_another_kind_is_refused(token_ids_kind, tmp_path, capsys):
    from desktop_app.cli import main
    from desktop_app.project.document import Project
    from desktop_app.project.iwb import save_project
    from desktop_app.project.specs import ActivationPatchingSpec

    from iwb_testkit import make_result

    project = Project()
    project.add_analysis(ActivationPatchingSpec("resid"))
    project.set_result("resid", make_result())
    save_project(project, tmp_path / "p.iwb")
    capsys.readouterr()
    assert main(["export", str(tmp_path / "p.iwb"), "--analysis", "resid", "--format", "tokjson",
                 "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "tokjson" in err and "token_ids_test" in err


def test_a_kind_cannot_be_registered_twice_or_with_an_unknown_view(token_ids_kind):
    with pytest.raises(ValueError, match="twice"):
        kinds.register_kind(dataclasses.replace(token_ids_kind))
    with pytest.raises(ValueError, match="view"):
        dataclasses.replace(token_ids_kind, view="hologram")


@pytest.mark.parametrize("spec", all_specs(), ids=lambda s: s.kind)
def test_every_builtin_spec_round_trips(spec):
    assert analysis_from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_patching_results_carry_the_raw_logit_differences(ioi_gpt2_dir):
    import torch

    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model
    from desktop_app.project.execute import analysis_job
    from desktop_app.project.specs import ActivationPatchingSpec, Prompts

    lm = load_model(str(ioi_gpt2_dir), dtype="float32", device="cpu")
    prompts = Prompts("When Mary and John went to the store, John gave a drink to",
                      "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
    result = drive(analysis_job(lm, prompts, ActivationPatchingSpec("r", positions="all")))
    a, w = lm.single_token_id(" Mary", "answer"), lm.single_token_id(" John", "wrong")
    for what, text in (("clean", prompts.clean), ("corrupted", prompts.corrupted)):
        with torch.no_grad():
            logits = lm.model(torch.tensor([lm.tokenize(text).ids])).logits[0, -1]
        assert float(result.extras[f"{what}_logit_diff"]) == pytest.approx(float(logits[a] - logits[w]), abs=1e-5)
    assert kinds.raw_logit_diffs(result).keys() == {"clean", "corrupted"}
    assert result.clean_metric == pytest.approx(1.0) and result.corrupted_metric == pytest.approx(0.0)


def test_a_broken_kind_module_is_named_and_the_others_keep_working(monkeypatch):
    monkeypatch.setitem(kinds.LOAD_ERRORS, "imaginary_lens", "ImportError: no module named 'imaginary'")
    with pytest.raises(SpecError, match="imaginary_lens failed to load .*imaginary"):
        analysis_from_dict({"name": "x", "kind": "imaginary_lens"})
    assert analysis_from_dict({"name": "r", "kind": "activation_patching"}).kind == "activation_patching"
