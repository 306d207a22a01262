"""The window's runner drives every job inside torch.inference_mode(); the attribution graph's backward passes must
still run there and give the same graph as outside it."""
import numpy as np
import torch

from desktop_app.demo_assets import demo_transcoders_dir, resources_dir
from desktop_app.engine.attribution_graph import attribution_graph_job
from desktop_app.engine.jobs import drive
from desktop_app.engine.loading import load_model


def test_graph_under_inference_mode_equals_the_graph_outside_it():
    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    plain = drive(attribution_graph_job(lm, tokens, str(demo_transcoders_dir()), max_n_logits=3))
    with torch.inference_mode():
        inside = drive(attribution_graph_job(lm, tokens, str(demo_transcoders_dir()), max_n_logits=3))
    assert list(inside.extras["node_ids"]) == list(plain.extras["node_ids"])
    np.testing.assert_allclose(inside.extras["adjacency"], plain.extras["adjacency"], rtol=0, atol=1e-6)
