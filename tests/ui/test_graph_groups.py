"""Supernodes in the graph view on the demo model's graph: group / rename / ungroup / unpin through the view are
commands on the window's undo stack that restore the exact params, tree and boxes; subgraph mode draws the summed
edges a plain loop over the adjacency gives; SVG / PDF export; a written JSON re-opens with its groups."""
import copy
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import pyqtgraph as pg
from PySide6.QtCore import Qt

from desktop_app.demo_assets import resources_dir


@pytest.fixture(scope="module")
def demo_graph():
    from desktop_app.engine.attribution_graph import attribution_graph_job
    from desktop_app.engine.jobs import drive
    from desktop_app.engine.loading import load_model

    demo = resources_dir() / "demo"
    lm = load_model(demo / "model", dtype="float32", device="cpu")
    tokens = lm.tokenize("When Mary and John went to the store, John gave a drink to", True)
    return drive(attribution_graph_job(lm, tokens, str(demo / "transcoders"), max_n_logits=5))


class _Click:
    def __init__(self, modifiers):
        self._modifiers = modifiers

    def modifiers(self):
        return self._modifiers


def _top(graph, kind, n):
    ex = graph.extras
    order = np.argsort(-ex["node_influence"], kind="stable")
    return [str(ex["node_ids"][i]) for i in order if ex["node_kind"][i] == kind][:n]


def _view(qtbot, result):
    from desktop_app.ui.graph_view import GraphView

    view = GraphView()
    qtbot.addWidget(view)
    view.resize(1200, 700)
    view.show_result(result)
    return view


def _tree(view):
    out = []
    t = view.panel.tree
    for i in range(t.topLevelItemCount()):
        top = t.topLevelItem(i)
        out.append((top.text(0), [top.child(j).text(0) for j in range(top.childCount())]))
    return out


def _drawn_labels(view):
    return sorted(item.toPlainText() for item in view.layer.items if isinstance(item, pg.TextItem))


def _two_groups(view, graph):
    feats = _top(graph, "feature", 6)
    for n in feats + _top(graph, "logit", 1) + _top(graph, "embedding", 1):
        view.toggle_pin(n)
    view.group(feats[:3], "name mover")
    view.group(feats[3:5], "subject")
    return feats


def test_group_rename_ungroup_undo_through_the_window(qtbot, window, demo_graph):
    from desktop_app.project import kinds
    from desktop_app.project.document import AnalysisEntry
    from desktop_app.project.undo import AddAnalysis
    from desktop_app.ui.kind_views import show_detail

    g = copy.deepcopy(demo_graph)
    g.name = "graph"
    spec = kinds.get("attribution_graph").spec(name="graph", transcoders=g.params["transcoders"])
    window.session.push(AddAnalysis(window.project, AnalysisEntry(spec, g, result_spec=spec)))
    show_detail(window, g, kinds.get("attribution_graph"))
    view = window.detail_views["graph"]
    feats = _top(g, "feature", 4)
    snaps = []

    def snap():
        return copy.deepcopy(g.params), _tree(view), _drawn_labels(view)

    def step(edit):
        snaps.append(snap())
        edit()
        assert snap() != snaps[-1]

    for n in feats:
        step(lambda n=n: view.toggle_pin(n))
    spots = {view.ids[int(p.data())]: p for p in view.scatter.points()}
    view._clicked(None, [spots[feats[0]]], _Click(Qt.ControlModifier))  # Ctrl+click selects, does not unpin
    assert view.panel.selected_node_ids() == [feats[0]] and feats[0] in view.pinned
    view.panel.select_node(feats[2])
    step(lambda: view.group_selected("name mover"))
    assert view.supernodes() == [("name mover", [feats[0], feats[2]])]
    assert g.params["supernodes"] == [["name mover", feats[0], feats[2]]]
    assert _drawn_labels(view) == ["name mover"] and window.undo_stack.undo_text() == "Group 2 nodes as name mover"
    view.panel.tree.clearSelection()
    view.panel.select_node(feats[2])  # a member row selects its supernode
    assert view.selected_group() == ("name mover", [feats[0], feats[2]])
    step(lambda: view.rename_selected("movers"))
    step(lambda: view.group([feats[1], feats[3]], "subject"))
    step(lambda: view.toggle_pin(feats[0]))  # unpinning a member takes it out of its supernode
    assert view.supernodes() == [("movers", [feats[2]]), ("subject", [feats[1], feats[3]])]
    view.panel.tree.clearSelection()
    view.panel.select_node(feats[1])
    step(view._ungroup_selected)
    assert view.supernodes() == [("movers", [feats[2]])] and feats[1] in view.pinned
    assert window.project.dirty
    final, n = snap(), len(snaps)
    while snaps:
        window.act_undo.trigger()  # Edit > Undo (Ctrl+Z)
        assert snap() == snaps.pop()
    assert "pinned_ids" not in g.params and _tree(view) == []
    for _ in range(n):
        window.act_redo.trigger()
    assert snap() == final and not window.undo_stack.can_redo()


def test_subgraph_edges_are_the_summed_adjacency(qtbot, demo_graph):
    g = copy.deepcopy(demo_graph)
    view = _view(qtbot, g)
    _two_groups(view, g)
    view.panel.subgraph_check.setChecked(True)
    assert view.shown_counts() == (0, 0)  # the full graph's nodes and edges are gone
    adj = g.extras["adjacency"].astype(np.float64)
    ids = [str(i) for i in g.extras["node_ids"]]
    groups = dict(view.supernodes())
    loose = [p for p in view.pinned if not any(p in m for m in groups.values())]
    members = {**{k: [ids.index(m) for m in v] for k, v in groups.items()}, **{p: [ids.index(p)] for p in loose}}
    labels = [u[0] for u in view.layer.units]
    assert sorted(labels) == sorted(members) and len(labels) == 2 + len(loose)
    want = {}
    for a in labels:
        for b in labels:
            if a != b:
                w = sum(adj[t, s] for t in members[a] for s in members[b])
                if w != 0:
                    want[(a, b)] = w
    for pct in (0, 30):
        view.edge_slider.setValue(pct)
        top = max(abs(w) for w in want.values())
        expected = {k: w for k, w in want.items() if abs(w) >= pct / 100 * top}
        got = {(labels[t], labels[s]): w for t, s, w in view.layer.drawn_edges}
        assert got.keys() == expected.keys() and len(got) >= 1
        for k in got:
            assert abs(got[k] - expected[k]) < 1e-9
        drawn = {it.toPlainText() for it in view.layer.items if isinstance(it, pg.TextItem)}
        assert {f"{w:+.3g}" for w in expected.values()} <= drawn and {"name mover", "subject"} <= {
            t.split("\n")[0] for t in drawn}
    spots = {int(p.data()): p for p in view.layer.unit_scatter.points()}
    view.layer.unit_scatter.sigHovered.emit(view.layer.unit_scatter, [spots[0]], None)  # hover a supernode
    card = view.card.text()
    assert card.startswith(f"{labels[0]}: ") and "summed weight into the other units" in card
    w = view.layer.unit_weights
    assert f"{w[:, 0].sum() - w[0, 0]:+.4g}" in card
    view._unit_clicked(None, [spots[1]])  # a click on the second supernode's box selects it
    assert view.selected_group() == view.supernodes()[1]
    view._unit_clicked(None, [spots[len(labels) - 1]])  # a pinned node outside the supernodes
    assert view.selected_group() is None and view.panel.selected_node_ids() == [labels[-1]]
    view.panel.subgraph_check.setChecked(False)
    assert view.shown_counts()[0] == len(ids)


def _svg_text(path):
    return [t.strip() for el in ET.parse(path).iter() if el.tag.endswith("text") for t in el.itertext() if t.strip()]


def test_svg_and_pdf_export(qtbot, demo_graph, tmp_path):
    g = copy.deepcopy(demo_graph)
    view = _view(qtbot, g)
    _two_groups(view, g)
    for mode in (False, True):
        view.panel.subgraph_check.setChecked(mode)
        view.export(tmp_path / f"g{mode}.svg")
        texts = set(_svg_text(tmp_path / f"g{mode}.svg"))
        shown = [t for _, t in view.plot.getAxis("bottom").shown_labels()]
        assert len(shown) == len(g.extras["prompt_tokens"])  # the demo's 15 tokens all fit (rotated)
        assert set(shown) <= texts, set(shown) - texts
        assert {"name mover", "subject"} <= texts
        if not mode:
            assert {it.toPlainText() for it in view.logit_labels} <= texts
        pdf = (tmp_path / f"g{mode}.pdf")
        view.export(pdf)
        data = pdf.read_bytes()
        assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
        assert len(re.findall(rb"/Type\s*/Page\b(?!s)", data)) == 1
        view.export(tmp_path / f"g{mode}.png")
        assert (tmp_path / f"g{mode}.png").stat().st_size > 5000
    from desktop_app.engine.errors import SpecError

    with pytest.raises(SpecError, match=r"\.png, \.svg or \.pdf"):
        view.export(tmp_path / "g.bmp")
    from desktop_app.ui.graph_export import with_suffix

    assert with_suffix("/a/graph", "PDF document (*.pdf)") == "/a/graph.pdf"  # the dialog's filter adds it
    assert with_suffix("/a.b/graph.svg", "PDF document (*.pdf)") == "/a.b/graph.svg"


def test_written_json_reopens_with_its_groups(qtbot, demo_graph, tmp_path):
    from desktop_app.project.graph_json import read_graph_json, write_graph_json

    g = copy.deepcopy(demo_graph)
    view = _view(qtbot, g)
    _two_groups(view, g)
    ex = g.extras
    back = read_graph_json(write_graph_json(g, tmp_path / "g.json"), int(ex["model_n_layers"]),
                           int(ex["model_vocab_size"]))
    again = _view(qtbot, back)
    assert again.supernodes() == view.supernodes() and len(view.supernodes()) == 2
    assert again.pinned == view.pinned
    assert _tree(again) == _tree(view) and _drawn_labels(again) == _drawn_labels(view)

    # a file's supernode of a node this graph lacks is kept (and written back) but drawn nowhere
    doc = json.loads((tmp_path / "g.json").read_text())
    doc["qParams"]["supernodes"].insert(0, ["ghost", "9_9_9"])
    (tmp_path / "h.json").write_text(json.dumps(doc))
    third = _view(qtbot, read_graph_json(tmp_path / "h.json", int(ex["model_n_layers"]), int(ex["model_vocab_size"])))
    assert third.supernodes() == [("ghost", ["9_9_9"])] + view.supernodes()
    assert _drawn_labels(third) == _drawn_labels(view)
    assert _tree(third)[0] == ("ghost  (1)", ["9_9_9 (not in this graph)"])
    third.panel.subgraph_check.setChecked(True)
    assert third.layer.unit_group == [1, 2] and len(third.layer.units) == len(view.pinned) - 5 + 2


def test_export_to_a_missing_folder_says_so_on_the_card(qtbot, demo_graph, tmp_path):
    from desktop_app.engine.errors import ProjectFileError

    view = _view(qtbot, demo_graph)
    target = tmp_path / "no such folder" / "g.png"
    with pytest.raises(ProjectFileError, match="does not exist"):
        view.export(target)
    view._try(lambda: view.export(target))
    assert "does not exist" in view.card.text()
    assert not target.exists()
