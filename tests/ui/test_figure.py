"""Publication figures: PNG pixels, SVG text, PDF pages, errors; checked by reading the files back."""
import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from desktop_app.engine.errors import ProjectFileError
from desktop_app.engine.results import AnalysisResult
from desktop_app.ui import colormaps
from desktop_app.ui.figure import figure_image, render_figure

RED = (178, 24, 43)  # ColorBrewer RdBu ends: what the largest |value| must be painted with
BLUE = (33, 102, 172)
TOKENS = ["<bos>", "When", "▁Mary", "▁and", "▁John", "▁went", "▁to", "<eos>&"]


@pytest.fixture(autouse=True)
def _app(qapp):
    """pytest-qt's QApplication (a QGuiApplication): creating a bare QGuiApplication here would break
    widget tests later in the same session."""
    return qapp


def patching_result(values=None, status="complete"):
    if values is None:
        values = np.full((6, len(TOKENS)), 0.05)
        values[2, 5] = 1.0  # the red cell
        values[4, 1] = -1.0  # the blue cell
    layers, positions = values.shape
    return AnalysisResult(
        "resid", "activation_patching",
        {"metric": "logit_diff_recovered", "component": "resid_pre", "direction": "denoise"},
        ["layer", "position"], values,
        {"layer": list(range(layers)), "position": [f"{i}: {t}" for i, t in enumerate(TOKENS[:positions])]},
        status=status, clean_metric=3.25, corrupted_metric=-1.5)


def pixels(img) -> np.ndarray:
    """QImage -> uint8 [h, w, 3] (RGB), independent of the figure code."""
    from PySide6.QtGui import QImage
    img = img.convertToFormat(QImage.Format_RGB888)
    w, h, stride = img.width(), img.height(), img.bytesPerLine()
    buf = np.frombuffer(bytes(img.constBits()), np.uint8).reshape(h, stride)
    return buf[:, : 3 * w].reshape(h, w, 3).copy()


def packed(rgb: np.ndarray) -> np.ndarray:
    """One int per pixel (0xRRGGBB), so counting colours is a fast 1-D np.unique."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def block(rgb: np.ndarray, color, min_run=40):
    """Bounding box (x0, x1, y0, y1) of the large block painted exactly `color`; thin strokes of the same
    colour (the colour bar's end) are ignored because their rows/columns hold fewer than min_run pixels."""
    mask = np.all(rgb == np.array(color, np.uint8), axis=-1)
    rows = np.nonzero(mask.sum(axis=1) >= min_run)[0]
    cols = np.nonzero(mask.sum(axis=0) >= min_run)[0]
    assert rows.size and cols.size, f"no block of colour {color}"
    return cols[0], cols[-1] + 1, rows[0], rows[-1] + 1


# ------------------------------------------------------------------------------------------- colour map

def test_diverging_lut_runs_blue_white_red():
    lut = colormaps.diverging_lut(257)
    assert lut.shape == (257, 3) and lut.dtype == np.uint8
    assert tuple(lut[0]) == BLUE and tuple(lut[-1]) == RED and tuple(lut[128]) == (255, 255, 255)
    assert np.all(np.diff(lut[:129, 0].astype(int)) >= 0)  # red channel rises towards white


def test_colormap_is_centred_on_zero_and_greys_nan():
    rgb = colormaps.colormap(np.array([[-2.0, 0.0, 2.0, np.nan]]), -2.0, 2.0)
    assert rgb.shape == (1, 4, 3)
    assert [tuple(c) for c in rgb[0]] == [BLUE, (255, 255, 255), RED, colormaps.NAN_RGB]
    # asymmetric limits still paint 0 white and each limit with its full end colour
    rgb = colormaps.colormap(np.array([-0.5, 0.0, 3.0]), -0.5, 3.0)
    assert [tuple(c) for c in rgb] == [BLUE, (255, 255, 255), RED]
    rgb = colormaps.colormap(np.array([np.nan, 0.0, 1.0]), 0.0, 1.0)  # one-sided limits keep NaN grey too
    assert [tuple(c) for c in rgb] == [colormaps.NAN_RGB, (255, 255, 255), RED]
    lut = colormaps.lut_for_limits(-0.5, 3.0, 8)
    assert np.array_equal(lut, colormaps.colormap(np.linspace(-0.5, 3.0, 8), -0.5, 3.0))


def test_color_limits():
    assert colormaps.color_limits(np.array([-0.2, 0.7, np.nan])) == (-0.7, 0.7)
    assert colormaps.color_limits(np.array([0.1, 0.4])) == (0.0, 0.4)  # probabilities: white to red
    assert colormaps.color_limits(np.array([np.nan])) == (-1.0, 1.0)
    assert colormaps.color_limits(np.array([-0.2, 0.7]), vmin=-2) == (-2.0, 0.7)
    with pytest.raises(ValueError):
        colormaps.color_limits(np.array([1.0]), vmin=2, vmax=1)


# --------------------------------------------------------------------------------------------------- PNG

def test_png_heatmap_puts_the_extremes_in_their_cells(tmp_path):
    path = render_figure(patching_result(), "png", tmp_path / "fig.png", width_px=1200, dpi=150)
    from PySide6.QtGui import QImage
    img = QImage(path)
    assert img.width() == 1200 and 400 < img.height() < 1400
    assert abs(img.dotsPerMeterX() * 0.0254 - 150) < 1
    rgb = pixels(img)
    assert len(np.unique(packed(rgb))) > 100  # not blank: cells, gradient, antialiased text
    rx0, rx1, ry0, ry1 = block(rgb, RED)
    bx0, bx1, by0, by1 = block(rgb, BLUE)
    cell_w, cell_h = rx1 - rx0, ry1 - ry0
    assert abs((bx1 - bx0) - cell_w) <= 2 and abs((by1 - by0) - cell_h) <= 2
    assert 1200 / 14 < cell_w < 1200 / len(TOKENS)
    # red at (layer 2, position 5), blue at (layer 4, position 1): rows go down, columns go right
    assert (rx0 - bx0) / cell_w == pytest.approx(5 - 1, abs=0.05)
    assert (ry0 - by0) / cell_h == pytest.approx(2 - 4, abs=0.05)


def test_png_nan_cells_are_hatched_grey():
    values = np.full((4, 5), 0.5)
    values[1, 1:3] = np.nan
    rgb = pixels(figure_image(patching_result(values), width_px=900))
    grey = np.all(rgb == np.array(colormaps.NAN_RGB, np.uint8), axis=-1).sum()
    hatch = (np.all(np.abs(rgb.astype(int) - 150) <= 8, axis=-1)).sum()  # the hatch lines' grey
    plain = pixels(figure_image(patching_result(np.full((4, 5), 0.5)), width_px=900))
    plain_grey = np.all(plain == np.array(colormaps.NAN_RGB, np.uint8), axis=-1).sum()
    cell_area = (900 / 6) ** 2 / 2  # a cell is well over this, whatever the margins
    assert grey > 2 * cell_area * 0.5 and hatch > 200 and plain_grey < 500


def test_png_bar_chart_heights_follow_values():
    values = np.array([1.0, 2.0, -1.0, 0.5])
    result = AnalysisResult("per_layer", "activation_patching", {"metric": "logit_diff"}, ["layer"], values,
                            {"layer": [0, 1, 2, 3]})
    rgb = pixels(figure_image(result, width_px=1000, height_px=600))
    assert rgb.shape[:2] == (600, 1000)
    codes, counts = np.unique(packed(rgb), return_counts=True)
    colors = [((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in codes[np.argsort(counts)[::-1]]]
    bars = [c for c in colors if len(set(c)) > 1][:2]  # the two bar colours (not greys)
    heights = []
    for color in bars:
        mask = np.all(rgb == np.array(color, np.uint8), axis=-1)
        per_col = mask.sum(axis=0)
        runs = np.split(per_col, np.nonzero(per_col == 0)[0])
        heights.append([r.max() for r in runs if r.size and r.max() > 0])
    positive, negative = sorted(heights, key=len, reverse=True)
    assert len(positive) == 3 and len(negative) == 1
    assert positive[1] / positive[0] == pytest.approx(2.0, rel=0.03)
    assert positive[2] / positive[0] == pytest.approx(0.5, rel=0.05)
    assert negative[0] / positive[0] == pytest.approx(1.0, rel=0.03)


def test_png_3d_result_shows_layer_by_head_summed_over_positions(tmp_path):
    values = np.zeros((4, 7, 3))
    values[1, :, 2] = 0.3  # sums to 2.1 over the 7 positions: the only red cell is (layer 1, head 2)
    values[3, 0, 0] = -0.5
    result = AnalysisResult("heads", "activation_patching", {"metric": "logit_diff", "component": "head_out"},
                            ["layer", "position", "head"], values, {"layer": [0, 1, 2, 3], "head": [0, 1, 2]})
    rgb = pixels(figure_image(result, width_px=1200))
    x0, x1, y0, y1 = block(rgb, RED)
    assert x1 - x0 > 1200 / 5  # three columns (heads), not seven (positions)
    svg = render_figure(result, "svg", tmp_path / "heads.svg")
    texts = svg_texts(svg)
    assert "head" in texts and "layer" in texts
    assert any("summed over position" in t for t in texts)


# ----------------------------------------------------------------------------------------------- SVG/PDF

def svg_texts(path) -> list[str]:
    root = ET.parse(path).getroot()
    return [("".join(el.itertext())).strip() for el in root.iter("{http://www.w3.org/2000/svg}text")]


def test_svg_parses_and_keeps_text_as_text(tmp_path):
    path = render_figure(patching_result(), "svg", tmp_path / "fig.svg", width_px=1000)
    root = ET.parse(path).getroot()
    assert root.get("viewBox").split()[2] == "1000"
    texts = svg_texts(path)
    assert "layer" in texts and "position" in texts
    assert "2: ▁Mary" in texts and "7: <eos>&" in texts  # XML-special characters escaped properly
    assert any("logit_diff_recovered" in t and "3.25" in t for t in texts)


def test_subtitle_names_the_model_prompts_and_raw_logit_differences(tmp_path):
    from desktop_app.project.specs import Prompts
    from desktop_app.ui.figure_data import figure_context

    r = patching_result()
    r.extras = {"clean_logit_diff": np.asarray(4.5), "corrupted_logit_diff": np.asarray(-2.25)}
    context = figure_context({"path": "/models/gpt2-small/", "config_hash": "ab", "quantize": "int8"},
                             Prompts("When Mary and John went", "When John and Mary went"))
    assert context == ["model gpt2-small (int8)", "clean “When Mary and John went”",
                       "corrupted “When John and Mary went”"]
    text = " ".join(svg_texts(render_figure(r, "svg", tmp_path / "fig.svg", width_px=1400, context=context)))
    for part in ("model gpt2-small (int8)", "When Mary and John went", "raw logit diff: clean 4.5",
                 "corrupted −2.25"):
        assert part in text, part
    big = pixels(figure_image(r, 1000, font_scale=1.6))
    small = pixels(figure_image(r, 1000, font_scale=0.8))
    assert big.shape[0] > small.shape[0]  # larger type takes more height at the same width
    with pytest.raises(ValueError, match="font scale"):
        figure_image(r, 1000, font_scale=10)


def test_pdf_is_one_page_of_the_figure_size(tmp_path):
    path = render_figure(patching_result(), "pdf", tmp_path / "fig.pdf", width_px=1200, dpi=150)
    data = Path(path).read_bytes()
    assert data.startswith(b"%PDF")
    assert len(re.findall(rb"/Type\s*/Page(?!s)", data)) == 1
    box = [float(v) for v in re.search(rb"/MediaBox\s*\[([^\]]*)\]", data).group(1).split()]
    assert box[2] == pytest.approx(1200 / 150 * 72, abs=1)
    assert b"/FontFile2" in data  # text is embedded as text with its font, not outlined


# ------------------------------------------------------------------------------------------------ errors

def test_missing_folder_is_a_project_file_error(tmp_path):
    target = tmp_path / "nope" / "fig.png"
    with pytest.raises(ProjectFileError, match=re.escape(str(target))):
        render_figure(patching_result(), "png", target)
    with pytest.raises(ValueError):
        render_figure(patching_result(), "jpg", tmp_path / "fig.jpg")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_folder_is_a_project_file_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for fmt in ("png", "svg", "pdf"):
            with pytest.raises(ProjectFileError, match="read-only"):
                render_figure(patching_result(), fmt, folder / f"fig.{fmt}")
    finally:
        folder.chmod(0o755)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_unwritable_folder_is_a_project_file_error_even_for_root():
    for fmt in ("png", "svg", "pdf"):
        with pytest.raises(ProjectFileError, match="/proc"):
            render_figure(patching_result(), fmt, f"/proc/fig.{fmt}")


def test_works_with_its_own_application_and_without_torch(tmp_path):
    """The command line's export makes its own Qt application; a window opened later in the same process
    (a script, the test suite) must still work, so it is a QApplication."""
    code = (
        "import sys\n"
        "import numpy as np\n"
        "from desktop_app.engine.results import AnalysisResult\n"
        "from desktop_app.ui.figure import ensure_gui_app, render_figure\n"
        "app = ensure_gui_app()\n"
        "assert type(app).__name__ == 'QApplication', type(app)\n"
        "from PySide6.QtWidgets import QMainWindow\n"
        "QMainWindow()\n"
        "assert ensure_gui_app() is app\n"
        "r = AnalysisResult('r', 'activation_patching', {}, ['layer', 'position'], np.eye(3))\n"
        f"render_figure(r, 'png', {str(tmp_path / 'f.png')!r})\n"
        "assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.png").stat().st_size > 1000


def test_figures_are_written_atomically_never_through_a_symlink(tmp_path):
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    for fmt in ("png", "svg", "pdf"):
        path = tmp_path / f"fig.{fmt}"
        os.symlink(victim, path)
        render_figure(patching_result(), fmt, path, width_px=400)
        assert not path.is_symlink() and path.stat().st_size > 100
        assert victim.read_text() == "keep me"
    assert (tmp_path / "fig.pdf").read_bytes().rstrip().endswith(b"%%EOF")
    assert not list(tmp_path.glob(".iwb-save-*"))
