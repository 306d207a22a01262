"""File > Open graph JSON…: a Neuronpedia / circuit-tracer attribution graph read through project.graph_json, checked
against the loaded model (layers, vocabulary), and added to the project as an analysis whose result is the file's
graph (an undoable add). The result is read-only: nothing recomputes it unless its spec is edited and run."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtWidgets import QFileDialog

from desktop_app.engine.errors import ProjectFileError
from desktop_app.project.document import AnalysisEntry, model_fingerprint
from desktop_app.project.undo import AddAnalysis


def _free_name(project, base: str) -> str:
    names, name, i = set(project.names()), base, 2
    while name in names:
        name, i = f"{base}_{i}", i + 1
    return name


def open_graph_json(window, path) -> str | None:
    """Add the graph in `path` to the window's project and select it; the new analysis's name, or None after one
    sentence in the message bar (no model loaded, not a graph, a graph of another model)."""
    from desktop_app.project import kinds
    from desktop_app.project.graph_json import read_graph_json

    loaded = window.model_loaded
    if loaded is None:
        window.show_message("Load the graph's model first: a graph JSON is checked against the loaded model's "
                            "layers and vocabulary.", "warning")
        return None
    try:
        result = read_graph_json(path, int(loaded.info["n_layers"]), int(loaded.info["vocab_size"]))
    except ProjectFileError as err:
        window.show_message(str(err), "error")
        return None
    project = window.project
    name = _free_name(project, "".join(c if c.isalnum() or c in "_-" else "_" for c in result.name) or "graph")
    result.name = name
    result.params.setdefault("source_file", str(Path(path)))
    spec = kinds.get("attribution_graph").spec(name=name, transcoders=result.params.get("transcoders", ""))
    entry = AnalysisEntry(spec, result, result_spec=spec, result_model=model_fingerprint(window.loaded_ref))
    window.session.push(AddAnalysis(project, entry))
    window.session.select(name)
    window.show_message(f"Opened the graph {Path(path).name} as {name!r} ({len(result.labels['node'])} nodes).")
    return name


def open_graph_json_dialog(window) -> None:
    path, _ = QFileDialog.getOpenFileName(window, "Open an attribution graph", "", "Graph JSON (*.json)")
    if path:
        open_graph_json(window, path)
