"""File > Export figure: size, resolution, title, font size and colour limits, with a live preview; for a kind
that draws one slice of its result (attention: a layer's head, query x key), which slice."""
from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QTimer
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFileDialog, QFormLayout,
                               QHBoxLayout, QLabel, QLineEdit, QSpinBox, QVBoxLayout)

from desktop_app.engine.errors import WorkbenchError

PREVIEW_W, PREVIEW_H = 520, 380


def _named(widget, name, tip):
    widget.setObjectName(name)
    widget.setToolTip(tip)
    return widget


class ExportFigureDialog(QDialog):
    def __init__(self, result, context: list[str], start_path: str, parent=None, selection: dict | None = None):
        super().__init__(parent)
        self.setObjectName("exportFigureDialog")
        self.setWindowTitle("Export figure")
        self.result, self.context, self.start_path = result, list(context), start_path
        self.width_spin = _named(QSpinBox(), "widthSpin", "Figure width in pixels")
        self.width_spin.setRange(200, 10_000)
        self.width_spin.setValue(1200)
        self.height_spin = _named(QSpinBox(), "heightSpin", "Figure height in pixels (auto: what the content needs)")
        self.height_spin.setRange(0, 10_000)
        self.height_spin.setSpecialValueText("auto")
        self.dpi_spin = _named(QSpinBox(), "dpiSpin", "Resolution stored in the file, in dots per inch")
        self.dpi_spin.setRange(30, 1200)
        self.dpi_spin.setValue(150)
        from desktop_app.ui.figure_data import default_title

        self.title_edit = _named(QLineEdit(default_title(result)), "titleEdit", "The figure's title (empty: none)")
        self.font_spin = _named(QSpinBox(), "fontSizeSpin", "Text size, in percent of the default")
        self.font_spin.setRange(25, 400)
        self.font_spin.setSuffix(" %")
        self.font_spin.setValue(100)
        self.vmin_edit = _named(QLineEdit(), "vminEdit", "Lower colour (or axis) limit; empty: from the data")
        self.vmax_edit = _named(QLineEdit(), "vmaxEdit", "Upper colour (or axis) limit; empty: from the data")
        for e in (self.vmin_edit, self.vmax_edit):
            e.setPlaceholderText("auto")
        self.format_combo = _named(QComboBox(), "figureFormatCombo", "File format")
        self.format_combo.addItems(["png", "svg", "pdf"])
        self.preview = _named(QLabel(), "figurePreview", "How the exported figure will look")
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumSize(PREVIEW_W, PREVIEW_H)
        self.error_label = _named(QLabel(""), "figureErrorLabel", "Why the figure cannot be drawn with these settings")
        self.error_label.setWordWrap(True)
        self.slice_combos = self._slice_combos(selection)

        form = QFormLayout()
        size = QHBoxLayout()
        size.addWidget(self.width_spin)
        size.addWidget(QLabel("×"))
        size.addWidget(self.height_spin)
        form.addRow("Size (px)", size)
        form.addRow("DPI", self.dpi_spin)
        form.addRow("Title", self.title_edit)
        form.addRow("Font size", self.font_spin)
        limits = QHBoxLayout()
        limits.addWidget(self.vmin_edit)
        limits.addWidget(QLabel("to"))
        limits.addWidget(self.vmax_edit)
        form.addRow("Colour limits", limits)
        form.addRow("Format", self.format_combo)
        for dim, combo in self.slice_combos.items():
            form.addRow(dim.capitalize(), combo)
        buttons = QDialogButtonBox(QDialogButtonBox.Save | QDialogButtonBox.Cancel)
        buttons.setObjectName("exportFigureButtons")
        buttons.accepted.connect(self._save_clicked)
        buttons.rejected.connect(self.reject)
        row = QHBoxLayout()
        row.addLayout(form)
        row.addWidget(self.preview, 1)
        lay = QVBoxLayout(self)
        lay.addLayout(row)
        lay.addWidget(self.error_label)
        lay.addWidget(buttons)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(150)
        self._timer.timeout.connect(self.update_preview)
        for w in (self.width_spin, self.height_spin, self.dpi_spin, self.font_spin):
            w.valueChanged.connect(self._timer.start)
        for e in (self.title_edit, self.vmin_edit, self.vmax_edit):
            e.textChanged.connect(self._timer.start)
        for combo in self.slice_combos.values():
            combo.currentIndexChanged.connect(self._timer.start)
        self.written: str | None = None
        self.update_preview()

    def _slice_combos(self, selection: dict | None) -> dict[str, QComboBox]:
        """One combo per dim the kind's figure chooses (attention patterns: layer and head), starting at the
        slice the result pane shows; none for kinds that draw the whole result."""
        from desktop_app.project import kinds
        from desktop_app.project.kinds._figure import dim_labels

        try:
            sliced = kinds.figure_slice(self.result, selection or None)
        except WorkbenchError:
            sliced = kinds.figure_slice(self.result, None)
        combos = {}
        for dim, index in (sliced.chosen.items() if sliced is not None else ()):
            combo = _named(QComboBox(), f"{dim}FigureCombo", f"Which {dim} the figure shows")
            combo.addItems(dim_labels(self.result, dim))
            combo.setCurrentIndex(index)
            combos[dim] = combo
        return combos

    def selection(self) -> dict[str, int]:
        return {dim: combo.currentIndex() for dim, combo in self.slice_combos.items()}

    def _limit(self, edit: QLineEdit, name: str):
        text = edit.text().strip()
        if not text:
            return None
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"the {name} colour limit must be a number, not {text!r}") from None

    def options(self) -> dict:
        """The figure options as render_figure takes them (ValueError for an unreadable limit)."""
        return dict(width_px=self.width_spin.value(), height_px=self.height_spin.value() or None,
                    dpi=float(self.dpi_spin.value()), title=self.title_edit.text(),
                    vmin=self._limit(self.vmin_edit, "lower"), vmax=self._limit(self.vmax_edit, "upper"),
                    font_scale=self.font_spin.value() / 100.0, context=self.context, selection=self.selection())

    def update_preview(self) -> bool:
        from desktop_app.ui.figure import figure_image

        try:
            img = figure_image(self.result, **self.options())
        except (ValueError, WorkbenchError) as err:
            self.error_label.setText(f"⛔ {err}")
            return False
        self.error_label.setText("")
        self.preview.setPixmap(QPixmap.fromImage(img).scaled(PREVIEW_W, PREVIEW_H, Qt.KeepAspectRatio,
                                                             Qt.SmoothTransformation))
        return True

    def export_to(self, path, fmt: str | None = None) -> bool:
        from desktop_app.ui.figure import render_figure

        fmt = fmt or Path(path).suffix.lstrip(".").lower() or self.format_combo.currentText()
        try:
            self.written = render_figure(self.result, fmt, path, **self.options())
        except (ValueError, WorkbenchError) as err:
            self.error_label.setText(f"⛔ {err}")
            return False
        return True

    def _save_clicked(self):
        fmt = self.format_combo.currentText()
        start = str(Path(self.start_path).with_suffix("." + fmt))
        path, _ = QFileDialog.getSaveFileName(self, "Export figure", start, f"{fmt.upper()} (*.{fmt})")
        if not path:
            return
        if Path(path).suffix.lower().lstrip(".") not in ("png", "svg", "pdf"):
            path += "." + fmt
        if self.export_to(path):
            self.accept()
