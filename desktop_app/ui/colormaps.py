"""The diverging blue-white-red colour map shared by exported figures and the window's heatmaps (numpy only).

White is always the colour of 0 when 0 lies inside the limits (a two-slope mapping, as matplotlib's
TwoSlopeNorm): negative values use the blue half scaled by |vmin|, positive values the red half scaled by
vmax. With the default symmetric limits this is the ordinary linear map; with limits (0, vmax), as for
probabilities, it becomes white-to-red instead of wasting the blue half.
"""
from __future__ import annotations

import numpy as np

# Anchors of ColorBrewer's RdBu, reversed (blue for negative), with pure white at the centre.
_ANCHORS = np.array([
    (33, 102, 172), (103, 169, 207), (209, 229, 240), (255, 255, 255),
    (253, 219, 199), (239, 138, 98), (178, 24, 43),
], dtype=np.float64)
_ANCHOR_POS = np.linspace(0.0, 1.0, len(_ANCHORS))

NAN_RGB = (225, 225, 225)  # background of cells that have no value (drawn hatched by the figure)


def color_limits(values, vmin=None, vmax=None) -> tuple[float, float]:
    """Colour limits for `values`: max|v| symmetric around 0, or (0, max) when no finite value is negative.

    A given vmin / vmax wins; a missing one is filled in from the data. Never returns an empty range.
    """
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    if m == 0.0:
        m = 1.0
    nonneg = finite.size > 0 and float(finite.min()) >= 0.0
    lo = float(vmin) if vmin is not None else (0.0 if nonneg else -m)
    hi = float(vmax) if vmax is not None else m
    if vmin is not None and vmax is None and lo >= hi:
        hi = lo + 1.0
    if vmax is not None and vmin is None and lo >= hi:
        lo = hi - 1.0
    if lo >= hi:
        raise ValueError(f"colour limits must satisfy vmin < vmax, got vmin={lo:g}, vmax={hi:g}")
    return lo, hi


def normalize(values, vmin: float, vmax: float) -> np.ndarray:
    """Position in the colour map (0 = full blue, 0.5 = white, 1 = full red); NaN stays NaN."""
    v = np.asarray(values, dtype=np.float64)
    if vmin < 0.0 < vmax or vmin == 0.0 or vmax == 0.0:
        centre = 0.0
    else:  # 0 is outside the limits: centre the map on their midpoint
        centre = 0.5 * (vmin + vmax)
    with np.errstate(invalid="ignore", divide="ignore"):
        upper = 0.5 + 0.5 * (v - centre) / (vmax - centre) if vmax > centre else np.full_like(v, 0.5)
        lower = 0.5 - 0.5 * (centre - v) / (centre - vmin) if vmin < centre else np.full_like(v, 0.5)
        t = np.where(v >= centre, upper, lower)
    return np.where(np.isnan(v), np.nan, np.clip(t, 0.0, 1.0))


def colormap(values, vmin: float, vmax: float, nan_rgb=NAN_RGB) -> np.ndarray:
    """Map values to colours: uint8 array of shape values.shape + (3,); NaN cells get `nan_rgb`."""
    t = normalize(values, vmin, vmax)
    nan = np.isnan(t)
    t = np.where(nan, 0.5, t)
    rgb = np.stack([np.interp(t, _ANCHOR_POS, _ANCHORS[:, c]) for c in range(3)], axis=-1)
    rgb = np.rint(rgb).astype(np.uint8)
    rgb[nan] = nan_rgb
    return rgb


def diverging_lut(n: int = 256) -> np.ndarray:
    """The full blue-white-red map as a lookup table, uint8 [n, 3] (for pyqtgraph with symmetric levels)."""
    return colormap(np.linspace(-1.0, 1.0, n), -1.0, 1.0)


def lut_for_limits(vmin: float, vmax: float, n: int = 256) -> np.ndarray:
    """A LUT that, spread linearly over levels (vmin, vmax), reproduces `colormap` for those limits.

    pyqtgraph maps levels linearly onto its LUT, so asymmetric limits need this table to keep 0 white.
    """
    return colormap(np.linspace(vmin, vmax, n), vmin, vmax)
