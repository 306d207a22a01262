"""Measure how well the demo graph's linear prediction holds: for the 10 most influential feature nodes of the demo
graph (as the app computes it), clamp each (ablate: delta = -activation; small: delta = -1e-3 x activation) and
print the largest disagreement of each measurement with the prediction, relative to the largest predicted change.

    PYTHONPATH=$PWD python packaging/graph_check_demo.py
"""
import numpy as np
import torch

from desktop_app.demo_assets import resources_dir
from desktop_app.engine.attribution_graph import attribution_graph_job, build_graph
from desktop_app.engine.graph_check import clamp_check, predicted_logit_change
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model
from desktop_app.engine.transcoders import load_transcoder_set

PROMPT = "When Mary and John went to the store, John gave a drink to"


def main():
    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize(PROMPT, True)
    tset = load_transcoder_set(demo / "transcoders")
    ex = drive(attribution_graph_job(lm, tokens, "", tset=tset, max_n_logits=5)).extras
    g = drive(build_graph(lm, torch.tensor([tokens.ids]), tset, max_n_logits=5))
    full = {"node_ids": np.array(g.node_ids()), "node_kind": np.array(g.node_kind), "adjacency": g.adjacency,
            "node_activation": g.activation}
    f = np.where(ex["node_kind"] == "feature")[0]
    top = f[np.argsort(-ex["node_influence"][f])][:10]
    print(f"{len(f)} feature nodes kept of {int((full['node_kind'] == 'feature').sum())}; logits "
          f"{list(lm.tokens_of_ids(ex['node_feature'][ex['node_kind'] == 'logit']).display)}")
    print("columns: |measured - predicted (pruned graph)| / max|predicted| for the graph's model, the real model with "
          "frozen attention+norms, the real model; then the full (unpruned) graph's prediction against the graph's "
          "model, and frozen against the graph's model (real MLPs against transcoders + errors)")
    print("node        delta     max|pred|  graph     frozen    real      full vs graph  frozen vs graph  crossings")
    worst = {k: 0.0 for k in ("graph", "frozen", "real", "full", "mlps")}
    for scale in (-1e-3, -1.0):
        for i in top:
            node = str(ex["node_ids"][i])
            delta = scale * float(ex["node_activation"][i])
            c = clamp_check(lm, tokens.ids, tset, ex, node, delta)
            p = np.abs(c["predicted"]).max()
            full_pred, _ = predicted_logit_change(full, node, delta)
            rel = {k: np.abs(c[f"measured_{k}"] - c["predicted"]).max() / p for k in ("graph", "frozen", "real")}
            rel["full"] = np.abs(c["measured_graph"] - full_pred).max() / p
            rel["mlps"] = np.abs(c["measured_frozen"] - c["measured_graph"]).max() / p
            if scale == -1.0:
                worst = {k: max(worst[k], v) for k, v in rel.items()}
            print(f"{node:10s} {scale:+8.0e}a  {p:9.2e}  {rel['graph']:8.3f}  {rel['frozen']:8.3f}  {rel['real']:8.3f}"
                  f"  {rel['full']:10.2e}     {rel['mlps']:8.3f}         {len(c['crossings'])}")
    print("worst relative disagreement at ablation:", {k: float(f"{v:.3g}") for k, v in worst.items()})


if __name__ == "__main__":
    main()
