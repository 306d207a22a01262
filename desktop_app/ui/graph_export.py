"""The graph view's plot written to a file: PNG (pyqtgraph's ImageExporter), SVG (its SVGExporter; the token, logit
and supernode labels stay text) or PDF (one page of vector drawing: the plot's part of the scene painted by a
QPdfWriter into a page of the plot's own size). Written like the result figures (ui.figure): the target is checked
first, the file is painted into memory and stored atomically, and a failed write says so."""
from __future__ import annotations

import os

from PySide6.QtCore import QBuffer, QIODevice, QMarginsF, QRectF, QSizeF
from PySide6.QtGui import QPageLayout, QPageSize, QPainter, QPdfWriter

from desktop_app.engine.errors import SpecError
from desktop_app.ui.figure import _check_target, _store, _write_failed

FILTERS = {"PNG image (*.png)": ".png", "SVG vector image (*.svg)": ".svg", "PDF document (*.pdf)": ".pdf"}


def export_plot(plot, path) -> None:
    """Write the PlotItem `plot` to `path` as PNG, SVG or PDF, chosen by the file's suffix."""
    path = os.fspath(path)
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix not in ("png", "svg", "pdf"):
        raise SpecError(f"cannot export the graph as .{suffix}; choose a .png, .svg or .pdf file.")
    _check_target(path)
    buf = QBuffer()
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if suffix == "svg":
        from pyqtgraph.exporters import SVGExporter

        buf.write(SVGExporter(plot).export(toBytes=True))
    elif suffix == "png":
        from pyqtgraph.exporters import ImageExporter

        if not ImageExporter(plot).export(toBytes=True).save(buf, "PNG"):
            raise _write_failed(path)
    else:
        _paint_pdf(plot, buf, path)
    _store(buf, path)


def _paint_pdf(plot, buf, path) -> None:
    source = plot.sceneBoundingRect()
    writer = QPdfWriter(buf)
    writer.setResolution(96)
    size = QPageSize(QSizeF(source.width(), source.height()), QPageSize.Point, "graph")
    writer.setPageLayout(QPageLayout(size, QPageLayout.Portrait, QMarginsF(0, 0, 0, 0)))
    painter = QPainter()
    if not painter.begin(writer):
        raise _write_failed(path)
    try:
        plot.scene().render(painter, QRectF(0, 0, writer.width(), writer.height()), source)
    finally:
        painter.end()
    del writer  # the PDF writer finishes its output when it goes


def with_suffix(path: str, chosen_filter: str) -> str:
    """The dialog's path with the chosen filter's suffix when the name has none."""
    return path if "." in path.rsplit("/", 1)[-1] else path + FILTERS.get(chosen_filter, ".png")
