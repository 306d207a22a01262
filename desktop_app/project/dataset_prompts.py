"""The prompts of an experiment or project as a dataset of pairs (contract 6.1).

`"prompts"` is one pair object (the first set, `specs.Prompts`), a list of pair objects, or
`{"dataset": "pairs.csv"}` / `.jsonl` (relative to the experiment file). A dataset is held as
`DatasetPrompts`; it is written back as the list form, so a saved project or experiment carries its pairs and
does not depend on the file it was read from. Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from desktop_app.engine.datasets import PairDataset, PairText, dataset_from_list, read_pair_file
from desktop_app.engine.errors import SpecError
from desktop_app.project.specs import Prompts


def _first(value) -> str:
    return value[0] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class DatasetPrompts:
    pairs: tuple[PairText, ...]
    source: str = ""  # the file the pairs were read from, if any (shown to people; not needed to reload)
    prepend_bos: bool | None = None

    def __post_init__(self):
        if not self.pairs:
            raise SpecError("a dataset needs at least one pair.")
        if self.prepend_bos not in (None, True, False):
            raise SpecError(f"prompts: field 'prepend_bos' must be true, false or null, not {self.prepend_bos!r}.")

    # the first pair, for the parts of the program that show one pair
    @property
    def clean(self) -> str:
        return self.pairs[0].clean

    @property
    def corrupted(self) -> str:
        return self.pairs[0].corrupted

    @property
    def answer(self) -> str:
        return _first(self.pairs[0].answer)

    @property
    def wrong_answer(self) -> str:
        return _first(self.pairs[0].wrong_answer)

    def __len__(self) -> int:
        return len(self.pairs)

    def with_field(self, field: str, value) -> "DatasetPrompts":
        """The dataset with one field of its first pair changed (the window shows and edits that pair). Named
        positions of the first pair are kept only while the text at each of them is unchanged; otherwise the
        run refuses the dataset with a sentence (pairs must name the same positions)."""
        if field == "prepend_bos":
            return replace(self, prepend_bos=value)
        first = self.pairs[0]
        changed = replace(first, **{field: value})
        if field in ("clean", "corrupted") and first.spans:
            which = 0 if field == "clean" else 1
            old = getattr(first, field)
            if any(old[sp[which][0]:sp[which][1]] != value[sp[which][0]:sp[which][1]] for sp in
                   [(c, k) for _, c, k in first.spans]):
                changed = replace(changed, spans=())
        return replace(self, pairs=(changed,) + self.pairs[1:])

    def dataset(self) -> PairDataset:
        return PairDataset(list(self.pairs), source=self.source)

    def to_dict(self) -> Any:
        items = [p.to_dict() for p in self.pairs]
        if self.prepend_bos is None and not self.source:
            return items
        out: dict[str, Any] = {"pairs": items}
        if self.source:
            out["source"] = self.source
        if self.prepend_bos is not None:
            out["prepend_bos"] = self.prepend_bos
        return out


def is_dataset(prompts) -> bool:
    return isinstance(prompts, DatasetPrompts)


def prompts_from_json(value, base_dir: str | os.PathLike | None = None, where: str = "prompts", progress=None):
    """Prompts (one pair) or DatasetPrompts from the JSON value of the `prompts` field. `progress(Progress)`
    follows the reading of a dataset file."""
    if isinstance(value, list):
        return DatasetPrompts(tuple(dataset_from_list(value, where).pairs))
    if isinstance(value, dict) and "dataset" in value:
        unknown = sorted(set(value) - {"dataset", "prepend_bos"})
        if unknown:
            raise SpecError(f"{where}: unknown field '{unknown[0]}' next to 'dataset'; known: dataset, prepend_bos.")
        name = value["dataset"]
        if not isinstance(name, str) or not name.strip():
            raise SpecError(f"{where}: field 'dataset' must be the path of a .csv or .jsonl file.")
        path = Path(os.path.expanduser(name))
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        data = read_pair_file(path, progress)
        return DatasetPrompts(tuple(data.pairs), source=name, prepend_bos=value.get("prepend_bos"))
    if isinstance(value, dict) and "pairs" in value:  # the form a project or a saved experiment writes
        unknown = sorted(set(value) - {"pairs", "source", "prepend_bos"})
        if unknown:
            raise SpecError(f"{where}: unknown field '{unknown[0]}' next to 'pairs'; known: pairs, source, "
                            "prepend_bos.")
        source = value.get("source", "")
        if not isinstance(source, str):
            raise SpecError(f"{where}: field 'source' must be a text string.")
        return DatasetPrompts(tuple(dataset_from_list(value["pairs"], f"{where}.pairs").pairs), source=source,
                              prepend_bos=value.get("prepend_bos"))
    return Prompts.from_dict(value)
