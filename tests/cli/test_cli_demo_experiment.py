"""The bundled demo experiment runs headless, and its heatmap's strongest cells are where the guide says."""
import json

import numpy as np

from desktop_app.cli import main
from desktop_app.demo_assets import demo_experiment_path
from desktop_app.project.iwb import load_project
from desktop_app.demo_assets import resources_dir


def test_demo_experiment_runs_headless(tmp_path, capsys):
    out = tmp_path / "demo.iwb"
    assert main(["run", str(demo_experiment_path()), "--out", str(out), "-q"]) == 0
    project = load_project(out)
    results = {entry.spec.name: entry.result for entry in project.analyses}
    assert {"resid", "heads", "attribution"} <= set(results)
    assert all(r.status == "complete" for r in results.values())
    facts = json.loads((resources_dir().parent / "packaging" / "demo-facts.json").read_text())
    resid = results["resid"].values
    for cell in facts["patching"]["resid"]["strongest_position_per_layer"]:
        assert int(np.argmax(resid[cell["layer"]])) == cell["position"]
    # the guide: layer 0 at the second " John" recovers everything, the rest of layer 0 nothing
    assert resid[0, 9] == np.float32(1.0) or abs(resid[0, 9] - 1) < 1e-5
    assert np.abs(np.delete(resid[0], 9)).max() < 1e-5
    assert results["resid"].labels["position"][9].endswith("John")
    heads = results["heads"].values  # [layer, head]
    assert np.unravel_index(np.argmax(heads), heads.shape) == (0, 3)
    assert main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [a["name"] for a in info["analyses"]] == ["resid", "heads", "attribution", "graph"]


def test_demo_attribution_graph_reproduces_the_logits(tmp_path):
    """The shipped transcoders open a graph whose logit nodes' inputs are the real model's logits."""
    import torch

    from desktop_app.engine.loading import load_model

    out = tmp_path / "demo.iwb"
    assert main(["run", str(demo_experiment_path()), "--out", str(out), "-q"]) == 0
    graph = {e.spec.name: e.result for e in load_project(out).analyses}["graph"]
    assert graph.status == "complete"
    ex = graph.extras
    assert float(ex["max_replacement_logit_diff"]) < 1e-4
    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    with torch.no_grad():
        real = lm.model(torch.tensor([list(graph.tokens_clean)])).logits[0, -1].numpy()
    is_logit = ex["node_kind"] == "logit"
    assert 1 <= is_logit.sum() <= 5
    np.testing.assert_allclose(ex["node_input"][is_logit], real[ex["node_feature"][is_logit]], atol=1e-4)
    assert real.argmax() in set(ex["node_feature"][is_logit].tolist())
    assert float(ex["replacement_score"]) > 0.9
