"""The result pane's selectors (ui.plots.ResultView): which part of a result is on screen. A result over a dataset
shows the mean over pairs or one pair; a head result per position shows the sum over positions or one position; a
result with more than two dims shows one index of each leading dim ([layer, head, query, key]: one layer's one head).
A mixin: it reads the view's `result` and calls its `_refresh(full=True)` when a selector changes."""
from __future__ import annotations

import numpy as np
from PySide6.QtWidgets import QComboBox

from desktop_app.engine.errors import WorkbenchError
from desktop_app.project import kinds


class ResultSelectors:
    def _add_selectors(self, top) -> None:
        """The pair and position combos, added to the view's top row `top`; slice combos go before the last."""
        self.position_combo = QComboBox()
        self.position_combo.setObjectName("headPositionCombo")
        self.position_combo.setToolTip("Head results per position: show the sum over positions or one position")
        self.position_combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
        self.position_combo.hide()
        self.pair_combo = QComboBox()  # a result over a dataset: the mean over pairs, or one pair's own values
        self.pair_combo.setObjectName("pairCombo")
        self.pair_combo.setToolTip("A result over a dataset of pairs: show the mean over pairs or one pair")
        self.pair_combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
        self.pair_combo.hide()
        top.addWidget(self.pair_combo)
        top.addWidget(self.position_combo)
        self._top = top
        self._slice_combos: dict[str, QComboBox] = {}  # leading dims of a result with more than two dims

    def per_pair(self) -> np.ndarray | None:
        """extras values_per_pair [pair, ...dims] of the result when it matches its values, else None."""
        r = self.result
        v = r.extras.get("values_per_pair") if r is not None else None
        if v is None or np.ndim(v) != r.values.ndim + 1 or tuple(np.shape(v)[1:]) != tuple(r.values.shape):
            return None
        return np.asarray(v)

    def pair_index(self) -> int | None:
        """The pair shown, or None for the mean over pairs."""
        i = self.pair_combo.currentIndex()
        return i - 1 if i > 0 and self.per_pair() is not None else None

    def _setup_pair_combo(self):
        per_pair = self.per_pair()
        keep = self.pair_combo.currentIndex()
        self.pair_combo.blockSignals(True)
        self.pair_combo.clear()
        if per_pair is not None:
            self.pair_combo.addItem("mean")
            self.pair_combo.addItems([f"pair {i}" for i in range(per_pair.shape[0])])
            self.pair_combo.setCurrentIndex(keep if 0 <= keep < self.pair_combo.count() else 0)
        self.pair_combo.setVisible(per_pair is not None)
        self.pair_combo.blockSignals(False)

    def _source_values(self) -> np.ndarray:
        pair = self.pair_index()
        return self.per_pair()[pair] if pair is not None else self.result.values

    def sem_at(self, cell) -> float | None:
        """The standard error of the mean at a shown cell (None when not a mean over pairs, or the shown value
        is a sum over positions, whose error is not the sum of the errors)."""
        r = self.result
        sem = r.extras.get("sem") if r is not None else None
        if sem is None or self.pair_index() is not None or np.shape(sem) != r.values.shape:
            return None
        shown, _dims, summed = self._slice(np.asarray(sem, dtype=np.float32))
        return None if summed else float(shown[cell])

    def _setup_position_combo(self):
        r = self.result
        self.position_combo.blockSignals(True)
        self.position_combo.clear()
        show = r is not None and r.values.ndim == 3 and "position" in r.dims
        if show:
            self.position_combo.addItem("sum over positions")
            labels = r.labels.get("position") or [str(i) for i in range(r.values.shape[r.dims.index("position")])]
            self.position_combo.addItems([f"position {lab}" for lab in labels])
        self.position_combo.setVisible(show)
        self.position_combo.blockSignals(False)
        self._setup_slice_combos()

    def _sliced_dims(self) -> list[str]:
        """Dims shown one index at a time: all but the last two of a result with more than two dims and no
        position dim to sum over ([layer, head, query, key] shows one layer's one head as query x key)."""
        r = self.result
        if r is None or r.values.ndim <= 2 or (r.values.ndim == 3 and "position" in r.dims):
            return []
        return list(r.dims[:-2])

    def _setup_slice_combos(self):
        for combo in self._slice_combos.values():
            self._top.removeWidget(combo)
            combo.deleteLater()
        self._slice_combos = {}
        r = self.result
        for dim in self._sliced_dims():
            n = r.values.shape[r.dims.index(dim)]
            labels = r.labels.get(dim) or list(range(n))
            combo = QComboBox()
            combo.setObjectName(f"{dim}SliceCombo")
            combo.setToolTip(f"Which {dim} to show")
            combo.addItems([f"{dim} {lab}" for lab in labels][:n])
            combo.currentIndexChanged.connect(lambda _i: self._refresh(full=True))
            self._top.insertWidget(self._top.count() - 1, combo)
            self._slice_combos[dim] = combo
        self._start_at_kind_default()

    def _start_at_kind_default(self):
        """The selectors start where the kind's figure does (attention rollout: the last layer)."""
        if not self._slice_combos:
            return
        try:
            sliced = kinds.figure_slice(self.result, None)
        except WorkbenchError:  # e.g. a dim of length 0: the selectors stay at index 0
            sliced = None
        for dim, index in (sliced.chosen.items() if sliced is not None else ()):
            combo = self._slice_combos.get(dim)
            if combo is not None and 0 <= index < combo.count():
                combo.blockSignals(True)
                combo.setCurrentIndex(index)
                combo.blockSignals(False)

    def figure_selection(self) -> dict[str, int]:
        """{dim: index} of the slice on screen, for a figure of the same slice (kinds with a figure_slice hook;
        others are drawn by the figure's own rule, so nothing is chosen for them)."""
        r = self.result
        record = kinds.find(r.kind) if r is not None else None
        if record is None or record.figure_slice is None:
            return {}
        return {dim: max(combo.currentIndex(), 0) for dim, combo in self._slice_combos.items()}

    def _shown_array(self):
        """(array 1-D or 2-D, its dims) for the result and the pair and position selectors."""
        values, dims, _summed = self._slice(np.asarray(self._source_values(), dtype=np.float32))
        return values, dims

    def shown_of(self, array) -> np.ndarray:
        """`array` (shaped like the result's values, e.g. one pair's) sliced and summed as the view shows it."""
        return self._slice(np.asarray(array, dtype=np.float32))[0]

    def _slice(self, values):
        summed = False
        dims = list(self.result.dims)
        for dim, combo in self._slice_combos.items():
            axis = dims.index(dim)
            values = np.take(values, max(combo.currentIndex(), 0), axis=axis)
            dims.pop(axis)
        while values.ndim > 2:
            axis = dims.index("position") if "position" in dims[1:] else values.ndim - 1
            choice = self.position_combo.currentIndex() if dims[axis] == "position" else 0
            if choice > 0:
                values = np.take(values, choice - 1, axis=axis)
            else:
                values = values.sum(axis=axis)  # NaN propagates: a partial sum is not shown as a sum
                summed = True
            dims.pop(axis)
        return values, dims, summed

    def cell_coordinates(self, cell) -> dict:
        """{dim: index} of a shown cell in the result's own dims; a dim summed over for display is left out."""
        r = self.result
        coords = dict(zip(self._dims, (int(i) for i in cell)))
        if r is not None and r.values.ndim > 2 and "position" in r.dims and self.position_combo.currentIndex() > 0:
            coords["position"] = self.position_combo.currentIndex() - 1
        for dim, combo in self._slice_combos.items():
            coords[dim] = max(combo.currentIndex(), 0)
        return coords

