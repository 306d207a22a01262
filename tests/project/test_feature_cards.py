"""A graph's feature cards are kept in its result: bounded to the graph's features, and a saved .iwb re-opens with
the same cards (no recomputation)."""
import numpy as np
import pytest

from desktop_app.demo_assets import demo_corpus_path, demo_transcoders_dir, resources_dir
from desktop_app.engine.jobs import drive
from desktop_app.project.feature_cards import CARDS_KEY, attach_cards, cards_info, cards_of, graph_features

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def graph_and_cards():
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.loading import load_model
    from desktop_app.engine.transcoder_dashboards import transcoder_dashboards_job

    lm = load_model(resources_dir() / "demo" / "model", dtype="float32", device="cpu")
    graph = drive(attribution_graph_job(lm, lm.tokenize(PROMPT, True), str(demo_transcoders_dir()), max_n_logits=5))
    features = graph_features(graph)
    cards = drive(transcoder_dashboards_job(lm, demo_transcoders_dir(), demo_corpus_path(), features=features,
                                            n_top=5, context=6))
    return graph, features, cards


def test_graph_features_are_the_distinct_feature_nodes_by_influence(graph_and_cards):
    graph, features, _cards = graph_and_cards
    ex = graph.extras
    f = np.where(ex["node_kind"] == "feature")[0]
    assert set(features) == set(zip(ex["node_layer"][f].tolist(), ex["node_feature"][f].tolist()))
    assert len(features) == len(set(features))
    best = {}
    for i in f:
        key = (int(ex["node_layer"][i]), int(ex["node_feature"][i]))
        best[key] = max(best.get(key, -np.inf), float(ex["node_influence"][i]))
    assert [best[k] for k in features] == sorted(best.values(), reverse=True)
    assert graph_features(graph, limit=3) == features[:3]


def test_cards_survive_iwb_save_and_load(graph_and_cards, tmp_path):
    from desktop_app.project.document import Project
    from desktop_app.project.iwb import load_project, save_project
    from desktop_app.project.kinds.attribution_graph import AttributionGraphSpec
    from desktop_app.project.specs import ModelRef, Prompts

    graph, features, cards = graph_and_cards
    assert cards_of(graph) == {} and cards_info(graph) is None
    attach_cards(graph, cards, str(demo_corpus_path()), str(demo_transcoders_dir()))
    try:
        stored = cards_of(graph)
        assert list(stored) == features
        assert all(not c.histogram_counts for c in stored.values())  # only what a card shows is kept
        project = Project(model=ModelRef(str(resources_dir() / "demo" / "model")), prompts=Prompts(PROMPT, PROMPT))
        project.add_analysis(AttributionGraphSpec(name="graph", transcoders=str(demo_transcoders_dir())))
        project.set_result("graph", graph)
        save_project(project, tmp_path / "p.iwb")
        back = load_project(tmp_path / "p.iwb").entry("graph").result
        again = cards_of(back)
        assert list(again) == features
        for key, card in stored.items():
            assert again[key] == card
        for key, card in zip(features, cards):
            assert again[key].top_contexts == card.top_contexts and again[key].promoted == card.promoted
            assert again[key].density == card.density
        assert cards_info(back) == {"transcoders": str(demo_transcoders_dir()), "corpus": str(demo_corpus_path()),
                                    "n_tokens": cards[0].n_tokens}
        assert sum(len(c.top_contexts) for c in again.values()) > 0
    finally:
        graph.extras.pop(CARDS_KEY, None)


def test_demo_corpus_is_what_train_demo_writes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_demo", resources_dir().parent / "packaging" / "train_demo.py")
    train_demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_demo)
    train_demo.write_cards_corpus(tmp_path / "corpus.txt")
    assert (tmp_path / "corpus.txt").read_bytes() == demo_corpus_path().read_bytes()


def test_feature_cards_import_without_qt_or_torch():
    import subprocess
    import sys

    code = ("import sys\nfor m in ('PySide6', 'pyqtgraph', 'torch', 'transformers'):\n    sys.modules[m] = None\n"
            "import desktop_app.project.feature_cards\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=resources_dir().parent, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
