"""The SAE feature pane (`saeFeatureView`): a feature x token heatmap, the top features of the selected token,
a dashboard browser and feature edits (ablate / clamp / steer) that the main window runs as a job.

Results and dashboards arrive as plain objects (AnalysisResult, FeatureDashboard or its dict); this module
never imports torch. pyqtgraph is imported when the pane first needs a plot.
"""
from __future__ import annotations

import html
import math

import numpy as np
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QListWidget, QListWidgetItem, QPushButton, QSpinBox, QSplitter, QTableWidget,
                               QTableWidgetItem, QTabWidget, QTextBrowser, QVBoxLayout, QWidget)

from desktop_app.engine.sae.dashboards import FeatureDashboard, search
from desktop_app.ui.colormaps import lut_for_limits

_MAX_TICK = 12


def _tick(text: str) -> str:
    text = str(text)
    return text if len(text) <= _MAX_TICK else text[:_MAX_TICK - 1] + "…"


def _named(widget, name: str, tip: str = ""):
    widget.setObjectName(name)
    if tip:
        widget.setToolTip(tip)
    return widget


class SAEFeatureView(QWidget):
    """The window embeds one of these; `interventionRequested` carries
    {"edits": [{"feature", "mode", "value", "positions"}], "keep_error": bool}."""

    interventionRequested = Signal(dict)
    tokenSelected = Signal(int)
    featureSelected = Signal(int)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("saeFeatureView")
        self.result = None
        self.dashboards: list[FeatureDashboard] = []
        self._features: list[int] = []  # feature ids of the heatmap rows
        self._tokens: list[str] = []
        self.plot = self.image_item = self.hist_plot = None

        self.title_label = _named(QLabel("Attach an SAE to a hook point to see its features here."), "saeTitle")
        self.title_label.setWordWrap(True)
        self.token_combo = _named(QComboBox(), "saeTokenCombo", "The token whose top features the table lists")
        self.token_combo.currentIndexChanged.connect(self._token_changed)
        self._plot_holder = QVBoxLayout()
        self.table = _named(QTableWidget(0, 2), "saeTopFeatureTable", "Top features of the selected token")
        self.table.setHorizontalHeaderLabels(["feature", "activation"])
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setSelectionBehavior(QTableWidget.SelectRows)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.cellClicked.connect(lambda row, _c: self._select_feature(int(self.table.item(row, 0).text())))

        heat = QWidget()
        hl = QVBoxLayout(heat)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.addWidget(self.title_label)
        hl.addLayout(self._plot_holder, 3)
        row = QHBoxLayout()
        row.addWidget(QLabel("Token:"))
        row.addWidget(self.token_combo, 1)
        hl.addLayout(row)
        hl.addWidget(self.table, 2)

        self.force_hook_check = _named(
            QCheckBox("force hook"), "forceHookCheck",
            "Attach the SAE even where its file names another hook or model (normally refused); recorded as force_hook")
        self.tabs = _named(QTabWidget(), "saeTabs")
        self.tabs.addTab(heat, "Features")
        self.tabs.addTab(self._build_browser(), "Dashboards")
        self.tabs.addTab(self._build_edits(), "Edit")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.force_hook_check)
        layout.addWidget(self.tabs)

    # ---- construction ------------------------------------------------------------------------------------
    def _build_browser(self) -> QWidget:
        w = QWidget()
        self.search_edit = _named(QLineEdit(), "saeSearchEdit",
                                  "Find features by id, by a word in their top contexts or by a promoted token")
        self.search_edit.setPlaceholderText("Search features…")
        self.search_edit.textChanged.connect(self._refilter)
        self.feature_list = _named(QListWidget(), "saeFeatureList", "Features with a dashboard")
        self.feature_list.currentItemChanged.connect(self._dashboard_item_changed)
        self.context_view = _named(QTextBrowser(), "saeContextView",
                                   "Top activating contexts; the most activating token is highlighted")
        self._hist_holder = QVBoxLayout()
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.setContentsMargins(0, 0, 0, 0)
        rl.addWidget(self.context_view, 3)
        rl.addLayout(self._hist_holder, 1)
        split = QSplitter(Qt.Horizontal)
        split.addWidget(self.feature_list)
        split.addWidget(right)
        split.setStretchFactor(1, 3)
        lay = QVBoxLayout(w)
        lay.addWidget(self.search_edit)
        lay.addWidget(split, 1)
        return w

    def _build_edits(self) -> QWidget:
        w = QWidget()
        form = QFormLayout(w)
        self.mode_combo = _named(QComboBox(), "saeEditMode", "ablate: set to 0; clamp: set to value; steer: add value")
        self.mode_combo.addItems(["ablate", "clamp", "steer"])
        self.feature_spin = _named(QSpinBox(), "saeEditFeature", "Feature id to edit")
        self.feature_spin.setRange(0, 10_000_000)
        self.value_spin = _named(QDoubleSpinBox(), "saeEditValue", "Value for clamp / steer")
        self.value_spin.setRange(-1e6, 1e6)
        self.value_spin.setDecimals(3)
        self.keep_error_check = _named(QCheckBox("keep error term"), "saeKeepError",
                                       "Add the SAE's reconstruction error back, so that no edit means no change")
        self.keep_error_check.setChecked(True)
        self.apply_button = _named(QPushButton("Apply"), "saeApplyButton", "Run the prompt with this feature edit")
        self.apply_button.clicked.connect(self._apply)
        self.intervention_view = _named(QTextBrowser(), "saeInterventionView",
                                        "Next-token distribution and greedy continuation before / after the edit")
        form.addRow("Mode", self.mode_combo)
        form.addRow("Feature", self.feature_spin)
        form.addRow("Value", self.value_spin)
        form.addRow("", self.keep_error_check)
        form.addRow("", self.apply_button)
        form.addRow(self.intervention_view)
        return w

    def _ensure_plots(self):
        if self.plot is not None:
            return
        import pyqtgraph as pg

        self.plot = pg.PlotWidget()
        self.plot.setObjectName("saeHeatmap")
        self.plot.setBackground(None)
        self.plot.setMenuEnabled(False)
        self.plot.hideButtons()
        self.plot.getViewBox().invertY(True)
        self.plot.getViewBox().setMouseEnabled(x=False, y=False)
        self.image_item = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image_item)
        self.colorbar = pg.ColorBarItem(values=(0, 1), colorMap=pg.ColorMap(np.linspace(0, 1, 256),
                                                                            lut_for_limits(0.0, 1.0)),
                                        interactive=False, width=14)
        self.colorbar.setImageItem(self.image_item, insert_in=self.plot.getPlotItem())
        self.plot.scene().sigMouseClicked.connect(self._heatmap_clicked)
        self._plot_holder.addWidget(self.plot)
        self.hist_plot = pg.PlotWidget()
        self.hist_plot.setObjectName("saeHistogram")
        self.hist_plot.setBackground(None)
        self.hist_plot.setLabel("bottom", "activation (log10)")
        self.hist_bars = pg.BarGraphItem(x=[], height=[], width=0.1, brush=pg.mkBrush(178, 24, 43))
        self.hist_plot.addItem(self.hist_bars)
        self._hist_holder.addWidget(self.hist_plot)

    # ---- feature activations -----------------------------------------------------------------------------
    def show_result(self, result) -> None:
        """Show an `sae_features` result: rows = features, columns = tokens."""
        self._ensure_plots()
        self.result = result
        values = np.asarray(result.values, dtype=np.float32)  # [position, feature]
        self._tokens = [str(t) for t in result.labels.get("position", range(values.shape[0]))]
        self._features = [int(f) for f in result.labels.get("feature", range(values.shape[1]))]
        image = np.nan_to_num(values.T, nan=0.0)  # [feature, position]
        vmax = float(image.max()) if image.size and image.max() > 0 else 1.0
        self.image_item.setImage(image, autoLevels=False, levels=(0.0, vmax))
        self.image_item.setLookupTable(lut_for_limits(0.0, vmax))
        self.colorbar.setLevels((0.0, vmax))
        plot_item = self.plot.getPlotItem()
        self._apply_ticks()
        plot_item.getAxis("left").setLabel("feature")
        plot_item.getAxis("bottom").setLabel("token")
        self.plot.setXRange(0, max(1, image.shape[1]), padding=0)
        self.plot.setYRange(0, max(1, image.shape[0]), padding=0)
        hook = result.params.get("hook", "") if isinstance(result.params, dict) else ""
        name = "" if hook and hook in result.name else f"{result.name}: "
        self.title_label.setText(f"{name}{len(self._features)} strongest features × {len(self._tokens)} tokens"
                                 + (f" at {hook}" if hook else ""))
        self.token_combo.blockSignals(True)
        self.token_combo.clear()
        self.token_combo.addItems(self._tokens)
        self.token_combo.blockSignals(False)
        if self._tokens:
            self.select_token(len(self._tokens) - 1)

    def _apply_ticks(self) -> None:
        if self.plot is None or self.result is None:
            return
        plot_item = self.plot.getPlotItem()
        # label only as many tokens / features as fit without overlapping (about 7 px a character, 14 px a row)
        widest = max((len(_tick(t.split(": ", 1)[-1])) for t in self._tokens), default=1)
        x_step = max(1, math.ceil(len(self._tokens) * (7 * widest + 8) / max(self.plot.width() - 60, 120)))
        y_step = max(1, math.ceil(len(self._features) * 14 / max(self.plot.height() - 40, 120)))
        plot_item.getAxis("bottom").setTicks([[(i + 0.5, _tick(t.split(": ", 1)[-1]))
                                               for i, t in enumerate(self._tokens) if i % x_step == 0]])
        plot_item.getAxis("left").setTicks([[(i + 0.5, str(f)) for i, f in enumerate(self._features)
                                             if i % y_step == 0]])

    def resizeEvent(self, event):
        super().resizeEvent(event)
        self._apply_ticks()  # how many labels fit depends on the plot's size

    def image_data(self) -> np.ndarray:
        return np.asarray(self.image_item.image) if self.image_item is not None else np.zeros((0, 0))

    def select_token(self, position: int) -> None:
        if self.token_combo.currentIndex() != position:
            self.token_combo.setCurrentIndex(position)  # calls back into _token_changed
        else:
            self._token_changed(position)

    def _token_changed(self, position: int) -> None:
        if self.result is None or position < 0:
            return
        row = np.nan_to_num(np.asarray(self.result.values[position], dtype=np.float64))
        order = [i for i in np.argsort(-row, kind="stable") if row[i] > 0][:20]
        self.table.setRowCount(len(order))
        for r, i in enumerate(order):
            self.table.setItem(r, 0, QTableWidgetItem(str(self._features[i])))
            self.table.setItem(r, 1, QTableWidgetItem(f"{row[i]:.4g}"))
        self.tokenSelected.emit(position)

    def top_features_shown(self) -> list[tuple[int, float]]:
        return [(int(self.table.item(r, 0).text()), float(self.table.item(r, 1).text()))
                for r in range(self.table.rowCount())]

    def _heatmap_clicked(self, event):
        if self.image_item is None or self.image_item.image is None:
            return
        pos = self.image_item.mapFromScene(event.scenePos())
        col, row = int(np.floor(pos.x())), int(np.floor(pos.y()))
        if 0 <= col < len(self._tokens):
            self.select_token(col)
        if 0 <= row < len(self._features):
            self._select_feature(self._features[row])

    def _select_feature(self, feature: int) -> None:
        self.feature_spin.setValue(int(feature))
        for i in range(self.feature_list.count()):
            if self.feature_list.item(i).data(Qt.UserRole) == feature:
                self.feature_list.setCurrentRow(i)
                break
        self.featureSelected.emit(int(feature))

    # ---- dashboards --------------------------------------------------------------------------------------
    def show_dashboards(self, dashboards) -> None:
        self._ensure_plots()
        self.dashboards = [d if isinstance(d, FeatureDashboard) else FeatureDashboard.from_dict(d) for d in dashboards]
        self._refilter(self.search_edit.text())

    def _refilter(self, text: str = "") -> None:
        shown = search(self.dashboards, text)
        self.feature_list.clear()
        for d in shown:
            item = QListWidgetItem(f"{d.feature}   max {d.max_activation:.3g}   density {d.density:.2%}")
            item.setData(Qt.UserRole, d.feature)
            self.feature_list.addItem(item)
        if shown:
            self.feature_list.setCurrentRow(0)
        else:
            self.context_view.setHtml("<i>No feature matches.</i>")

    def listed_features(self) -> list[int]:
        return [self.feature_list.item(i).data(Qt.UserRole) for i in range(self.feature_list.count())]

    def _dashboard_item_changed(self, item, _previous=None):
        if item is None:
            return
        feature = item.data(Qt.UserRole)
        dash = next((d for d in self.dashboards if d.feature == feature), None)
        if dash is not None:
            self.show_dashboard(dash)

    def show_dashboard(self, d: FeatureDashboard) -> None:
        parts = [f"<h3>Feature {d.feature}</h3><p>max {d.max_activation:.4g} · active on {d.density:.2%} of "
                 f"{d.n_tokens} tokens</p>"]
        for c in d.top_contexts:
            peak = max(c.activations) if c.activations and max(c.activations) > 0 else 1.0
            spans = []
            for j, tok in enumerate(c.tokens):
                a = c.activations[j] if j < len(c.activations) else 0.0
                alpha = max(0.0, min(1.0, a / peak))
                style = f"background-color: rgba(178,24,43,{alpha * 0.6:.2f});"
                text = html.escape(tok)
                if j == c.max_index:
                    text = f"<b><u>{text}</u></b>"
                spans.append(f'<span style="{style}" title="{a:.3g}">{text}</span>')
            parts.append(f"<p><tt>{c.activation:.3g}</tt> &nbsp; {''.join(spans)}</p>")
        if d.promoted:
            parts.append("<p><b>Promotes:</b> " + ", ".join(html.escape(t) for t, _ in d.promoted) + "</p>")
        if d.suppressed:
            parts.append("<p><b>Suppresses:</b> " + ", ".join(html.escape(t) for t, _ in d.suppressed) + "</p>")
        self.context_view.setHtml("".join(parts))
        edges = np.asarray(d.histogram_edges, dtype=np.float64)
        counts = np.asarray(d.histogram_counts, dtype=np.float64)
        if edges.size == counts.size + 1 and counts.size:
            centres = np.log10(np.sqrt(edges[:-1] * edges[1:]))
            width = float(np.diff(np.log10(edges)).mean())
            self.hist_bars.setOpts(x=centres, height=counts, width=width * 0.9)

    # ---- edits -------------------------------------------------------------------------------------------
    def edit_request(self) -> dict:
        mode = self.mode_combo.currentText()
        value = 0.0 if mode == "ablate" else float(self.value_spin.value())
        return {"edits": [{"feature": int(self.feature_spin.value()), "mode": mode, "value": value,
                           "positions": None}],
                "keep_error": bool(self.keep_error_check.isChecked())}

    def _apply(self):
        self.interventionRequested.emit(self.edit_request())

    def show_intervention(self, result) -> None:
        """Show an `sae_intervention` result, or the last position of an `sae_edit` one: top tokens with
        probabilities before / after and the continuations."""
        ex = result.extras
        last = result.kind == "sae_edit"  # [position, vocab_top_k]; its last_* extras are the [which, rank] view
        toks = np.asarray(ex.get("last_top_tokens" if last else "top_tokens", np.zeros((2, 0), dtype=str)))
        probs = np.asarray(ex["last_probs"] if last else result.values, dtype=np.float64)
        cont = [str(s) for s in np.asarray(ex.get("continuation", np.array(["", ""]))).reshape(-1)]
        rows = []
        for r in range(probs.shape[1] if probs.ndim == 2 else 0):
            cells = [f"<td>{html.escape(str(toks[w, r]))}</td><td>{probs[w, r]:.3f}</td>" for w in range(2)]
            rows.append(f"<tr><td>{r + 1}</td>{''.join(cells)}</tr>")
        kl = float(np.asarray(ex.get("kl", np.nan)).reshape(-1)[-1])
        text = ("<table cellspacing=4><tr><th>#</th><th colspan=2>before</th><th colspan=2>after</th></tr>"
                + "".join(rows) + f"</table><p>KL(before ‖ after) = {kl:.4g}</p>")
        if len(cont) == 2:
            text += (f"<p><b>before:</b> {html.escape(cont[0])}</p><p><b>after:</b> {html.escape(cont[1])}</p>")
        self.intervention_view.setHtml(text)
        self.tabs.setCurrentIndex(2)
