"""The graph view's plot written to a file: PNG (pyqtgraph's ImageExporter), SVG (its SVGExporter; the token, logit
and supernode labels stay text) or PDF (one page of vector drawing: the plot's part of the scene painted by a
QPdfWriter into a page of the plot's own size)."""
from __future__ import annotations

from PySide6.QtCore import QMarginsF, QRectF, QSizeF
from PySide6.QtGui import QPageLayout, QPageSize, QPainter, QPdfWriter

from desktop_app.engine.errors import SpecError

FILTERS = {"PNG image (*.png)": ".png", "SVG vector image (*.svg)": ".svg", "PDF document (*.pdf)": ".pdf"}


def export_plot(plot, path) -> None:
    """Write the PlotItem `plot` to `path` as PNG, SVG or PDF, chosen by the file's suffix."""
    suffix = str(path).lower().rsplit(".", 1)[-1]
    if suffix == "svg":
        from pyqtgraph.exporters import SVGExporter

        SVGExporter(plot).export(str(path))
    elif suffix == "png":
        export_png(plot, path)
    elif suffix == "pdf":
        export_pdf(plot, path)
    else:
        raise SpecError(f"cannot export the graph as .{suffix}; choose a .png, .svg or .pdf file.")


def export_png(plot, path) -> None:
    from pyqtgraph.exporters import ImageExporter

    ImageExporter(plot).export(str(path))


def export_pdf(plot, path) -> None:
    source = plot.sceneBoundingRect()
    writer = QPdfWriter(str(path))
    writer.setResolution(96)
    size = QPageSize(QSizeF(source.width(), source.height()), QPageSize.Point, "graph")
    writer.setPageLayout(QPageLayout(size, QPageLayout.Portrait, QMarginsF(0, 0, 0, 0)))
    painter = QPainter(writer)
    try:
        plot.scene().render(painter, QRectF(0, 0, writer.width(), writer.height()), source)
    finally:
        painter.end()


def with_suffix(path: str, chosen_filter: str) -> str:
    """The dialog's path with the chosen filter's suffix when the name has none."""
    return path if "." in path.rsplit("/", 1)[-1] else path + FILTERS.get(chosen_filter, ".png")
