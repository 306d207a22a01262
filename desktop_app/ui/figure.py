"""Publication figures of analysis results, painted with QPainter so that PNG, SVG and PDF look alike.

Needs only a QGuiApplication (no widgets), so the command line can export under QT_QPA_PLATFORM=offscreen.
Sizes follow matplotlib's model: the figure is width_px wide, fonts are given in points and converted with
`dpi`, so a 1200 px figure at 150 dpi is 8 inches wide with 9 pt tick labels.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass

import numpy as np
from PySide6.QtCore import QBuffer, QIODevice, QMarginsF, QPointF, QRectF, QSize, QSizeF, Qt
from PySide6.QtGui import (QColor, QFont, QFontMetricsF, QGuiApplication, QImage, QLinearGradient,
                           QPageLayout, QPageSize, QPainter, QPainterPath, QPdfWriter, QPen)
from PySide6.QtSvg import QSvgGenerator

from desktop_app.engine.errors import ProjectFileError, WorkbenchError
from desktop_app.engine.results import AnalysisResult
from desktop_app.project.atomic import atomic_write
from desktop_app.ui.colormaps import NAN_RGB, color_limits, colormap, lut_for_limits
from desktop_app.ui.figure_data import (MAX_BARS, FigureData, default_title, nice_step, prepare_data,
                                        subtitle_lines, value_name, value_ticks, wrap_text)

FORMATS = ("png", "svg", "pdf")
MAX_VECTOR_CELLS = 40_000  # beyond this a heatmap is drawn as one image rather than one rectangle per cell
_FONT_FAMILY = "DejaVu Sans"  # has the ▁ and Ġ of sentencepiece / BPE tokens; Qt falls back if absent
_INK = QColor(30, 30, 30)
_AXIS = QColor(90, 90, 90)
_GRID = QColor(225, 225, 225)
_HATCH = QColor(150, 150, 150)
_SIN45 = math.sqrt(0.5)

_app = None  # keeps the application created by ensure_gui_app alive


def ensure_gui_app():
    """Return the running Qt application, creating one if there is none. It is a QApplication (a QGuiApplication
    that also allows widgets), so that a window opened later in the same process does not abort Qt."""
    from PySide6.QtWidgets import QApplication

    global _app
    app = QGuiApplication.instance()
    if app is None:
        _app = app = QApplication([sys.argv[0] if sys.argv and sys.argv[0] else "interp-workbench"])
    return app


# --------------------------------------------------------------------------------------------- layout

class _Style:
    def __init__(self, width_px: int, dpi: float, font_scale: float = 1.0):
        px_per_pt = min(dpi / 72.0, width_px / 550.0)  # a small figure at a high dpi would be all text
        px_per_pt *= font_scale
        self.px = px_per_pt

        def font(pt, bold=False):
            f = QFont(_FONT_FAMILY)
            f.setPixelSize(max(6, round(pt * px_per_pt)))
            f.setBold(bold)
            return f, QFontMetricsF(f)
        self.title, self.fm_title = font(13, bold=True)
        self.sub, self.fm_sub = font(9.5)
        self.axis, self.fm_axis = font(10.5)
        self.tick, self.fm_tick = font(9)
        self.pad = 10 * px_per_pt
        self.gap = 4 * px_per_pt
        self.tick_len = 3.5 * px_per_pt
        self.line = max(1.0, 0.75 * px_per_pt)


@dataclass
class _XTicks:
    shown: list[int]
    rotated: bool
    depth: float  # how far the labels reach below the axis
    left_overflow: float  # how far the leftmost label reaches left of the plot's left edge


def _x_ticks(labels: list[str], fm: QFontMetricsF, cw: float, st: _Style) -> _XTicks:
    n = len(labels)
    widths = [fm.horizontalAdvance(t) for t in labels]
    h = fm.height()
    short = max(len(t) for t in labels) <= 4 or all(t.lstrip("-").isdigit() for t in labels)
    if short or max(widths) <= 0.92 * cw:
        step = nice_step((max(widths) + 2 * st.gap) / cw) if max(widths) > 0.92 * cw else 1
        shown = list(range(0, n, step))
        overflow = max(widths[i] / 2 - (i + 0.5) * cw for i in shown)
        return _XTicks(shown, False, st.tick_len + st.gap + h, overflow)
    step = nice_step(1.15 * h / (cw * _SIN45))
    shown = list(range(0, n, step))
    depth = st.tick_len + st.gap + max((widths[i] + h) * _SIN45 for i in shown)
    overflow = max((widths[i] + h / 2) * _SIN45 - (i + 0.5) * cw for i in shown)
    return _XTicks(shown, True, depth, overflow)


@dataclass
class _Layout:
    width: int
    height: int
    plot: QRectF
    xt: _XTicks
    y_shown: list[int]
    y_texts: list[str]
    y_numeric: list[float]
    vlim: tuple[float, float]
    cbar_ticks: list[tuple[float, str]]
    subtitle_rect: QRectF
    title_rect: QRectF
    cbar_label: str = ""


def _layout(data: FigureData, st: _Style, width: int, height, vlim, subtitle: str, title: str, cbar_label: str):
    heat = data.values.ndim == 2
    n_cols = data.values.shape[-1]
    n_rows = data.values.shape[0] if heat else 0
    x_labels = data.labels[-1]
    title_h = st.fm_title.height() if title else 0.0
    text_w = width - 2 * st.pad
    sub_h = st.fm_sub.height() * (subtitle.count("\n") + 1)
    top = st.pad + title_h + st.gap + sub_h + 2.5 * st.gap
    # the left margin holds the y axis title and the widest y tick label
    # tick density depends on the plot height, found later: reserve room for the widest candidate labels
    candidates = [t for target in (3, 5, 7, 9, 11) for _, t in value_ticks(*vlim, target, with_ends=heat)]
    value_w = max(st.fm_tick.horizontalAdvance(t) for t in candidates)
    y_w = max(st.fm_tick.horizontalAdvance(t) for t in data.labels[0]) if heat else value_w
    left = st.pad + st.fm_axis.height() + st.gap * 2 + y_w + st.gap + st.tick_len
    right = st.pad
    if heat:
        right += 4 * st.gap + 14 * st.px + st.tick_len + st.gap + value_w + 2 * st.gap
        right += st.fm_axis.height() if cbar_label else 0.0
    else:
        right += st.gap * 3
    xt = None
    for _ in range(3):  # the tick labels' left overflow moves the plot, which changes the cell width
        cw = (width - left - right) / n_cols
        if cw <= 0:
            raise ValueError(f"a figure {width} px wide is too narrow for {n_cols} columns")
        xt = _x_ticks(x_labels, st.fm_tick, cw, st)
        left = max(left, st.pad + xt.left_overflow)
    plot_w = width - left - right
    bottom = xt.depth + st.gap * 2 + st.fm_axis.height() + st.pad
    if height is None:
        ideal = (n_rows * plot_w / n_cols) if heat else 0.45 * plot_w
        plot_h = min(max(ideal, 0.25 * plot_w), 0.9 * plot_w)
        height = int(math.ceil(top + plot_h + bottom))
    plot_h = height - top - bottom
    if plot_h < 20:
        raise ValueError(f"a figure {height} px high leaves no room for the plot; use a larger height")
    plot = QRectF(left, top, plot_w, plot_h)
    target = int(min(11, max(3, plot_h / (2.6 * st.fm_tick.height()))))
    ticks = value_ticks(*vlim, target, with_ends=heat, min_gap=1.3 * st.fm_tick.height() / plot_h)
    cbar_ticks = ticks if heat else []
    if heat:
        y_texts, y_numeric = data.labels[0], []
        y_shown = list(range(0, n_rows, nice_step(1.1 * st.fm_tick.height() / (plot_h / n_rows))))
    else:
        y_numeric, y_texts = [v for v, _ in ticks], [t for _, t in ticks]
        y_shown = list(range(len(y_texts)))
    return _Layout(int(width), int(height), plot, xt, y_shown, y_texts, y_numeric, vlim, cbar_ticks,
                   QRectF(st.pad, st.pad + title_h + st.gap, text_w, sub_h),
                   QRectF(st.pad, st.pad, text_w, title_h), cbar_label if heat else "")


# ------------------------------------------------------------------------------------------- painting

def _hatch(p: QPainter, x0, y0, x1, y1, spacing):
    """Diagonal lines in a rectangle, drawn as plain segments (pattern brushes do not survive SVG export)."""
    c = math.ceil((x0 + y0) / spacing) * spacing
    while c < x1 + y1:
        xa, xb = max(x0, c - y1), min(x1, c - y0)
        if xb > xa:
            p.drawLine(QPointF(xa, c - xa), QPointF(xb, c - xb))
        c += spacing


def _draw_heatmap(p: QPainter, data: FigureData, lay: _Layout, st: _Style):
    values = data.values
    n_rows, n_cols = values.shape
    plot = lay.plot
    rgb = colormap(values, *lay.vlim)
    xs = plot.left() + np.arange(n_cols + 1) * plot.width() / n_cols
    ys = plot.top() + np.arange(n_rows + 1) * plot.height() / n_rows
    nan = np.isnan(values)
    if values.size <= MAX_VECTOR_CELLS:
        p.setPen(Qt.NoPen)
        for r in range(n_rows):
            for c in range(n_cols):
                # cells overlap their right/lower neighbour a little so no hairline seams show in viewers
                w = xs[c + 1] - xs[c] + (0.5 if c < n_cols - 1 else 0.0)
                h = ys[r + 1] - ys[r] + (0.5 if r < n_rows - 1 else 0.0)
                p.fillRect(QRectF(xs[c], ys[r], w, h), QColor(*(int(v) for v in rgb[r, c])))
    else:
        img = QImage(np.ascontiguousarray(np.dstack([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)]))
                     .tobytes(), n_cols, n_rows, 4 * n_cols, QImage.Format_RGBA8888).copy()
        p.setRenderHint(QPainter.SmoothPixmapTransform, False)
        p.drawImage(plot, img)
    if nan.any():
        p.setPen(QPen(_HATCH, st.line * 0.8))
        spacing = max(4.0, 5 * st.px)
        for r, c in zip(*np.nonzero(nan)):
            _hatch(p, xs[c], ys[r], xs[c + 1], ys[r + 1], spacing)
    p.setPen(QPen(_AXIS, st.line))
    p.setBrush(Qt.NoBrush)
    p.drawRect(plot)
    # y tick labels: categories, first row at the top (as imshow and TransformerLens plots do)
    p.setFont(st.tick)
    fm = st.fm_tick
    for r in lay.y_shown:
        yc = (ys[r] + ys[r + 1]) / 2
        p.drawLine(QPointF(plot.left() - st.tick_len, yc), QPointF(plot.left(), yc))
        text = lay.y_texts[r]
        p.drawText(QPointF(plot.left() - st.tick_len - st.gap - fm.horizontalAdvance(text),
                           yc + (fm.ascent() - fm.descent()) / 2), text)
    _draw_x_ticks(p, data.labels[-1], lay, st, xs)
    _draw_colorbar(p, lay, st)


def _draw_x_ticks(p: QPainter, labels: list[str], lay: _Layout, st: _Style, xs):
    plot, fm = lay.plot, st.fm_tick
    p.setFont(st.tick)
    p.setPen(QPen(_AXIS, st.line))
    y0 = plot.bottom()
    for i in lay.xt.shown:
        xc = (xs[i] + xs[i + 1]) / 2
        p.drawLine(QPointF(xc, y0), QPointF(xc, y0 + st.tick_len))
        text = labels[i]
        w = fm.horizontalAdvance(text)
        if lay.xt.rotated:
            p.save()
            p.translate(xc, y0 + st.tick_len + st.gap)
            p.rotate(-45)
            p.drawText(QPointF(-w - st.gap, (fm.ascent() - fm.descent()) / 2), text)
            p.restore()
        else:
            p.drawText(QPointF(xc - w / 2, y0 + st.tick_len + st.gap + fm.ascent()), text)


def _draw_colorbar(p: QPainter, lay: _Layout, st: _Style):
    plot = lay.plot
    vmin, vmax = lay.vlim
    bar = QRectF(plot.right() + 4 * st.gap, plot.top(), 14 * st.px, plot.height())
    grad = QLinearGradient(bar.bottomLeft(), bar.topLeft())
    lut = lut_for_limits(vmin, vmax, 65)
    for k, color in enumerate(lut):
        grad.setColorAt(k / (len(lut) - 1), QColor(*(int(v) for v in color)))
    p.fillRect(bar, grad)
    p.setPen(QPen(_AXIS, st.line))
    p.setBrush(Qt.NoBrush)
    p.drawRect(bar)
    fm = st.fm_tick
    p.setFont(st.tick)
    label_w = 0.0
    for value, text in lay.cbar_ticks:
        y = bar.bottom() - (value - vmin) / (vmax - vmin) * bar.height()
        p.drawLine(QPointF(bar.right(), y), QPointF(bar.right() + st.tick_len, y))
        p.drawText(QPointF(bar.right() + st.tick_len + st.gap, y + (fm.ascent() - fm.descent()) / 2), text)
        label_w = max(label_w, fm.horizontalAdvance(text))
    if lay.cbar_label:
        _vertical_text(p, lay.cbar_label, st, bar.right() + st.tick_len + 2 * st.gap + label_w, bar.center().y())


def _vertical_text(p: QPainter, text: str, st: _Style, x_left: float, y_centre: float):
    """Axis title rotated to read bottom-to-top, its box starting at x_left and centred on y_centre."""
    fm = st.fm_axis
    p.save()
    p.setFont(st.axis)
    p.setPen(_INK)
    p.translate(x_left + fm.ascent(), y_centre)
    p.rotate(-90)
    p.drawText(QPointF(-fm.horizontalAdvance(text) / 2, 0), text)
    p.restore()


def _draw_series(p: QPainter, data: FigureData, lay: _Layout, st: _Style):
    values = data.values
    n = values.size
    plot = lay.plot
    lo, hi = lay.vlim
    xs = plot.left() + np.arange(n + 1) * plot.width() / n

    def y_of(v):
        return plot.bottom() - (v - lo) / (hi - lo) * plot.height()
    fm = st.fm_tick
    p.setFont(st.tick)
    for value, text in zip(lay.y_numeric, lay.y_texts):
        y = y_of(value)
        p.setPen(QPen(_GRID, st.line))
        p.drawLine(QPointF(plot.left(), y), QPointF(plot.right(), y))
        p.setPen(QPen(_AXIS, st.line))
        p.drawLine(QPointF(plot.left() - st.tick_len, y), QPointF(plot.left(), y))
        p.drawText(QPointF(plot.left() - st.tick_len - st.gap - fm.horizontalAdvance(text),
                           y + (fm.ascent() - fm.descent()) / 2), text)
    pos, neg = colormap(np.array([0.8, -0.8]), -1.0, 1.0)
    zero = y_of(min(max(0.0, lo), hi))
    p.save()
    p.setClipRect(plot)
    if n <= MAX_BARS:
        for i, v in enumerate(values):
            cw = xs[i + 1] - xs[i]
            x0 = xs[i] + 0.15 * cw
            if np.isnan(v):
                p.fillRect(QRectF(x0, plot.top(), 0.7 * cw, plot.height()), QColor(*NAN_RGB))
                p.setPen(QPen(_HATCH, st.line * 0.8))
                _hatch(p, x0, plot.top(), x0 + 0.7 * cw, plot.bottom(), max(4.0, 5 * st.px))
                continue
            y = y_of(v)
            color = pos if v >= 0 else neg
            p.fillRect(QRectF(x0, min(y, zero), 0.7 * cw, abs(zero - y)), QColor(*(int(c) for c in color)))
    else:
        p.setPen(QPen(QColor(*(int(c) for c in pos)), 1.5 * st.line))
        path, pen_down = QPainterPath(), False
        for i, v in enumerate(values):
            pt = QPointF((xs[i] + xs[i + 1]) / 2, y_of(v) if np.isfinite(v) else 0.0)
            if not np.isfinite(v):
                pen_down = False
            elif pen_down:
                path.lineTo(pt)
            else:
                path.moveTo(pt)
                pen_down = True
        p.drawPath(path)
    p.restore()
    p.setPen(QPen(_AXIS, st.line))
    if lo < 0 < hi:
        p.drawLine(QPointF(plot.left(), zero), QPointF(plot.right(), zero))
    p.setBrush(Qt.NoBrush)
    p.drawRect(plot)
    _draw_x_ticks(p, data.labels[-1], lay, st, xs)


@dataclass
class _Figure:
    data: FigureData
    style: _Style
    layout: _Layout
    title: str
    subtitle: str
    x_title: str
    y_title: str


def _build(result: AnalysisResult, width_px, height_px, dpi, title, vmin, vmax, font_scale: float = 1.0,
           context: list[str] | None = None, selection: dict | None = None) -> _Figure:
    ensure_gui_app()
    if width_px < 200:
        raise ValueError(f"a figure must be at least 200 px wide, not {width_px}")
    data = prepare_data(result, selection)
    if data.values.size == 0:
        raise WorkbenchError(f"The analysis {result.name!r} has no values to draw; run it before exporting a figure.")
    if not 0.25 <= float(font_scale) <= 4.0:
        raise ValueError(f"the font scale must be between 0.25 and 4, not {font_scale:g}")
    st = _Style(int(width_px), float(dpi), float(font_scale))
    title = default_title(result) if title is None else title
    subtitle = wrap_text(list(context or []) + subtitle_lines(result, data), st.fm_sub, width_px - 2 * st.pad)
    metric = value_name(result)
    if data.values.ndim == 2:
        vlim = color_limits(data.values, vmin, vmax)
        x_title, y_title = data.dims[1], data.dims[0]
    else:
        finite = data.values[np.isfinite(data.values)]
        lo = min(0.0, float(finite.min())) if finite.size else 0.0
        hi = max(0.0, float(finite.max())) if finite.size else 1.0
        pad = 0.05 * ((hi - lo) or 1.0)
        lo = float(vmin) if vmin is not None else (lo - pad if lo < 0 else lo)
        hi = float(vmax) if vmax is not None else hi + pad
        if lo >= hi:
            raise ValueError(f"axis limits must satisfy vmin < vmax, got {lo:g} and {hi:g}")
        vlim = (lo, hi)
        x_title, y_title = data.dims[0], metric
    lay = _layout(data, st, int(width_px), height_px, vlim, subtitle, title, metric)
    return _Figure(data, st, lay, title, subtitle, x_title, y_title)


def _paint(p: QPainter, fig: _Figure):
    st, lay = fig.style, fig.layout
    p.setRenderHint(QPainter.Antialiasing, True)
    p.setRenderHint(QPainter.TextAntialiasing, True)
    p.fillRect(QRectF(0, 0, lay.width, lay.height), QColor(255, 255, 255))
    p.setPen(_INK)
    if fig.title:
        p.setFont(st.title)
        p.drawText(lay.title_rect, Qt.AlignHCenter | Qt.AlignTop, fig.title)
    p.setFont(st.sub)
    p.setPen(QColor(70, 70, 70))
    p.drawText(lay.subtitle_rect, Qt.AlignHCenter | Qt.AlignTop, fig.subtitle)
    if fig.data.values.ndim == 2:
        p.setRenderHint(QPainter.Antialiasing, False)  # crisp cell edges
        _draw_heatmap(p, fig.data, lay, st)
        p.setRenderHint(QPainter.Antialiasing, True)
    else:
        _draw_series(p, fig.data, lay, st)
    plot = lay.plot
    p.setFont(st.axis)
    p.setPen(_INK)
    fm = st.fm_axis
    p.drawText(QPointF(plot.center().x() - fm.horizontalAdvance(fig.x_title) / 2,
                       plot.bottom() + lay.xt.depth + 2 * st.gap + fm.ascent()), fig.x_title)
    y_tick_w = max(st.fm_tick.horizontalAdvance(lay.y_texts[i]) for i in lay.y_shown)
    x_left = plot.left() - st.tick_len - 2 * st.gap - y_tick_w - fm.height()
    _vertical_text(p, fig.y_title, st, max(st.pad, x_left), plot.center().y())


# ------------------------------------------------------------------------------------------ public API

def figure_image(result: AnalysisResult, width_px: int = 1200, height_px: int | None = None, dpi: float = 150,
                 title: str | None = None, vmin: float | None = None, vmax: float | None = None,
                 font_scale: float = 1.0, context: list[str] | None = None, selection: dict | None = None) -> QImage:
    """The figure as an ARGB32 image (for the clipboard, or to save as PNG), with `dpi` stored in it.
    context: subtitle parts naming what the result was computed from (figure_context: the model, the prompts).
    selection: {dim: index or label} of a kind with a figure_slice hook (attention: {"layer": "2", "head": 0})."""
    fig = _build(result, width_px, height_px, dpi, title, vmin, vmax, font_scale, context, selection)
    img = QImage(fig.layout.width, fig.layout.height, QImage.Format_ARGB32)
    img.fill(QColor(255, 255, 255))
    dots_per_metre = round(dpi / 0.0254)
    img.setDotsPerMeterX(dots_per_metre)
    img.setDotsPerMeterY(dots_per_metre)
    p = QPainter(img)
    try:
        _paint(p, fig)
    finally:
        p.end()
    return img


def _check_target(path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ProjectFileError(f"Cannot write the figure to {path} because it is a folder; give a file name.")
    if not os.path.isdir(folder):
        raise ProjectFileError(f"Cannot write the figure to {path} because the folder {folder} does not exist; "
                               f"create it or choose another path.")
    if not os.access(folder, os.W_OK):
        raise ProjectFileError(f"Cannot write the figure to {path} because the folder {folder} is read-only; "
                               f"choose a folder you can write to.")


def _write_failed(path: str) -> ProjectFileError:
    return ProjectFileError(f"Could not write the figure to {path}; check that its folder is writable and the "
                            f"disk is not full.")


def render_figure(result: AnalysisResult, fmt: str, path, width_px: int = 1200, height_px: int | None = None,
                  dpi: float = 150, title: str | None = None, vmin: float | None = None,
                  vmax: float | None = None, font_scale: float = 1.0, context: list[str] | None = None,
                  selection: dict | None = None) -> str:
    """Write the figure of `result` as PNG, SVG or PDF to `path`; returns the path written."""
    fmt = fmt.lower()
    if fmt not in FORMATS:
        raise ValueError(f"figure format must be one of {FORMATS}, not {fmt!r}")
    path = os.fspath(path)
    _check_target(path)
    # Painted into memory, then written like every other file (atomic_write): a unique temporary file
    # beside the target, never through a symlink planted at the target, never half a figure.
    buf = QBuffer()
    buf.open(QIODevice.OpenModeFlag.WriteOnly)
    if fmt == "png":
        if not figure_image(result, width_px, height_px, dpi, title, vmin, vmax, font_scale, context,
                            selection).save(buf, "PNG"):
            raise _write_failed(path)
        return _store(buf, path)
    fig = _build(result, width_px, height_px, dpi, title, vmin, vmax, font_scale, context, selection)
    w, h = fig.layout.width, fig.layout.height
    if fmt == "svg":
        device = QSvgGenerator()
        device.setOutputDevice(buf)
        device.setSize(QSize(w, h))
        device.setViewBox(QRectF(0, 0, w, h))
        device.setResolution(int(round(dpi)))
        device.setTitle(fig.title)
        device.setDescription(fig.subtitle)
    else:
        device = QPdfWriter(buf)
        device.setResolution(int(round(dpi)))
        device.setTitle(fig.title)
        device.setCreator("Interp Workbench")
        page = QPageSize(QSizeF(w * 72.0 / dpi, h * 72.0 / dpi), QPageSize.Unit.Point, "",
                         QPageSize.SizeMatchPolicy.ExactMatch)
        device.setPageLayout(QPageLayout(page, QPageLayout.Orientation.Portrait, QMarginsF(0, 0, 0, 0)))
    p = QPainter()
    if not p.begin(device):
        raise _write_failed(path)
    try:
        if fmt == "pdf":  # the page is w x h pixels at `dpi` up to rounding; scale the rest away
            p.scale(device.width() / w, device.height() / h)
        _paint(p, fig)
    finally:
        p.end()
    del device  # the PDF and SVG writers finish their output when they go
    return _store(buf, path)


def _store(buf, path: str) -> str:
    data = bytes(buf.data())
    if not data:
        raise _write_failed(path)
    atomic_write(path, lambda f: f.write(data), what="figure")
    return path
