"""Time and size of the demo graph's feature cards (transcoder dashboards over resources/demo/corpus.txt), for the
graph's own features and for every feature of the demo's transcoders; one CPU thread, best of 3.

    PYTHONPATH=$PWD .venv/bin/python packaging/bench_feature_cards.py
"""
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from desktop_app.demo_assets import demo_corpus_path, demo_model_dir, demo_transcoders_dir  # noqa: E402
from desktop_app.engine.attribution_graph import attribution_graph_job  # noqa: E402
from desktop_app.engine.jobs import drive  # noqa: E402
from desktop_app.engine.loading import load_model  # noqa: E402
from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job  # noqa: E402
from desktop_app.project.feature_cards import CARDS_KEY, attach_cards, graph_features  # noqa: E402
from desktop_app.ui.graph_card import N_CONTEXTS, N_TOKENS, WINDOW  # noqa: E402

PROMPT = "When Mary and John went to the store, John gave a drink to"


def main() -> None:
    torch.set_num_threads(1)
    lm = load_model(demo_model_dir(), dtype="float32", device="cpu")
    graph = drive(attribution_graph_job(lm, lm.tokenize(PROMPT, True), str(demo_transcoders_dir()), max_n_logits=5))
    for label, features in (("graph features", graph_features(graph)), ("every feature", None)):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            cards = drive(transcoder_dashboards_job(lm, demo_transcoders_dir(), demo_corpus_path(), features=features,
                                                    n_top=N_CONTEXTS, context=WINDOW, n_logit=N_TOKENS))
            best = min(best, time.perf_counter() - t0)
        attach_cards(graph, cards, str(demo_corpus_path()), str(demo_transcoders_dir()))
        size = len(str(graph.extras[CARDS_KEY].item()).encode())
        print(f"{label}: {len(cards)} cards over {cards[0].n_tokens} tokens in {best:.3f} s (best of 3), "
              f"{size} bytes stored")


if __name__ == "__main__":
    main()
