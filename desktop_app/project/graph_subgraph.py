"""The pinned subgraph of an attribution graph (no Qt, no torch): pinned node ids and supernodes, kept in the result's
params as Neuronpedia keeps them in a graph JSON's qParams (`pinned_ids` <-> pinnedIds; `supernodes` <-> supernodes,
a list of [label, node_id, node_id, ...] lists), the edits of that state as undoable commands, and the summed edges
between the subgraph's units (a supernode, or a pinned node that is in none).

A supernode's members are pinned nodes and belong to one supernode only; unpinning a member takes it out of its
supernode, and a supernode left without members is dropped."""
from __future__ import annotations

import copy

import numpy as np

from desktop_app.engine.errors import SpecError
from desktop_app.project.undo import Command


def supernodes_of(params: dict | None) -> list[tuple[str, list[str]]]:
    """(label, member ids) of each well-formed [label, id, ...] entry of params["supernodes"]."""
    out = []
    for s in (params or {}).get("supernodes") or []:
        if isinstance(s, (list, tuple)) and len(s) >= 2:
            out.append((str(s[0]), [str(x) for x in s[1:]]))
    return out


def pinned_of(params: dict | None) -> list[str]:
    return [str(p) for p in (params or {}).get("pinned_ids") or []]


def as_params(pinned: list[str], groups: list[tuple[str, list[str]]]) -> dict:
    """The params entries of a subgraph state, in the JSON's format."""
    return {"pinned_ids": list(pinned), "supernodes": [[label, *members] for label, members in groups]}


# ---- edits: each takes and returns (pinned, groups); nothing is modified in place --------------------------------
def toggled(pinned, groups, node_id: str):
    if node_id in pinned:
        groups = [(label, [m for m in members if m != node_id]) for label, members in groups]
        return [p for p in pinned if p != node_id], [g for g in groups if g[1]]
    return [*pinned, node_id], list(groups)


def grouped(pinned, groups, label: str, node_ids: list[str]):
    """A new supernode `label` of node_ids (pinned if they were not), taken out of the supernodes they were in."""
    label = str(label).strip()
    ids = list(dict.fromkeys(str(i) for i in node_ids))
    if not label:
        raise SpecError("a supernode needs a label; type one.")
    if not ids:
        raise SpecError("select the pinned nodes to group first.")
    taken = set(ids)
    groups = [(lab, [m for m in members if m not in taken]) for lab, members in groups]
    pinned = [*pinned, *(i for i in ids if i not in pinned)]
    return pinned, [g for g in groups if g[1]] + [(label, ids)]


def ungrouped(pinned, groups, index: int):
    """Supernode `index` dissolved; its members stay pinned."""
    _check_index(groups, index)
    return list(pinned), [g for j, g in enumerate(groups) if j != index]


def renamed(pinned, groups, index: int, label: str):
    _check_index(groups, index)
    label = str(label).strip()
    if not label:
        raise SpecError("a supernode needs a label; type one.")
    return list(pinned), [(label if j == index else lab, list(m)) for j, (lab, m) in enumerate(groups)]


def _check_index(groups, index: int) -> None:
    if not 0 <= index < len(groups):
        raise SpecError(f"there is no supernode number {index + 1}; this graph has {len(groups)}.")


class SetSubgraph(Command):
    """Set the pinned ids and supernodes of analysis `name`'s graph; undo puts back exactly what was there (the
    keys absent before stay absent)."""

    def __init__(self, project, name: str, pinned: list[str], groups: list[tuple[str, list[str]]], text: str):
        params = project.entry(name).result.params
        self.name, self.text = name, text
        self.old = {k: copy.deepcopy(params[k]) if k in params else None for k in ("pinned_ids", "supernodes")}
        self.new = as_params(pinned, groups)

    def redo(self, project):
        project.set_result_params(self.name, self.new)

    def undo(self, project):
        project.set_result_params(self.name, self.old)


# ---- the subgraph's units and their summed edges -----------------------------------------------------------------
def units(ids: list[str], pinned: list[str], groups: list[tuple[str, list[str]]]) -> list[tuple[str, list[int]]]:
    """(label, node indices) of each unit of the subgraph: the supernodes (members the graph has), then each pinned
    node in no supernode (labelled with its id). Units without a node of this graph are left out."""
    index = {n: i for i, n in enumerate(ids)}
    out, grouped_ids = [], set()
    for label, members in groups:
        idx = [index[m] for m in members if m in index]
        grouped_ids.update(members)
        if idx:
            out.append((label, idx))
    out += [(p, [index[p]]) for p in pinned if p in index and p not in grouped_ids]
    return out


def unit_adjacency(adjacency: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """[target unit, source unit]: the sum of the edge weights adjacency[t, s] over t in the target's members and
    s in the source's (the diagonal holds the edges inside a unit)."""
    m = np.zeros((len(members), adjacency.shape[0]))
    for u, idx in enumerate(members):
        m[u, idx] = 1.0
    return m @ np.asarray(adjacency, dtype=np.float64) @ m.T
