"""Screenshots of the real demo window for the README: runs the demo's resid patching, a logit lens, attention
patterns, token attribution and the attribution graph (hovering a feature node for its card), and captures the X
screen after each (`import -window root`, ImageMagick).

    Xvfb :99 -screen 0 1600x1000x24 &
    DISPLAY=:99 QT_QPA_PLATFORM=xcb PYTHONPATH=$PWD python packaging/take_screenshots.py OUT_FOLDER

Needs the Debian packages xvfb, imagemagick, libxcb-icccm4 and libxcb-keysyms1. Files: patching.png,
logit_lens.png, attention.png, token_attribution.png, graph_card.png (docs/screenshots/ keeps them under other names)."""
import os
import subprocess
import sys
import tempfile
import time

# a fresh settings / autosave folder: a saved window layout or a recovery offer would change the pictures
_private = tempfile.mkdtemp(prefix="iwb-shots-")
os.environ.setdefault("INTERP_WORKBENCH_CONFIG_DIR", os.path.join(_private, "config"))
os.environ.setdefault("INTERP_WORKBENCH_DATA_DIR", os.path.join(_private, "data"))

from PySide6.QtCore import QTimer

from desktop_app.ui.app import make_application

OUT = sys.argv[1] if len(sys.argv) > 1 else "screenshots"
os.makedirs(OUT, exist_ok=True)
app = make_application(["iwb"])
from desktop_app.ui import create_main_window  # noqa: E402

window = create_main_window(["iwb"], demo=True)
window.confirm_dialogs = False
window.setGeometry(0, 0, 1600, 1000)
window.show()

steps = []
state = {"i": 0, "ended": None, "t": time.time()}
window.analysis_ended.connect(lambda s: state.__setitem__("ended", s))


def shot(name):
    app.processEvents()
    path = os.path.join(OUT, f"{name}.png")
    subprocess.run(["import", "-window", "root", path], check=True)
    print("shot", path, flush=True)


def run_kind(kind, fields=None):
    def go():
        a = window.analysis_panel
        a.set_kind(kind)
        for k, v in (fields or {}).items():
            a.set_field(k, v)
        state["ended"] = None
        window.run_analysis()
    return go


def run_named(name):
    def go():
        state["ended"] = None
        window.run_named(name)
    return go


plan = [("wait_model", None), ("do", run_named("resid")), ("wait_run", None), ("settle", None),
        ("shot", "patching"),
        ("do", run_kind("logit_lens")), ("wait_run", None), ("settle", None), ("shot", "logit_lens"),
        ("do", run_kind("attention_patterns")), ("wait_run", None), ("settle", None), ("shot", "attention"),
        ("do", run_kind("token_attribution")), ("wait_run", None), ("settle", None), ("shot", "token_attribution"),
        ("do", run_named("graph")), ("wait_run", None), ("wait_cards", None), ("do", lambda: hover_feature()),
        ("settle", None), ("shot", "graph_card"),
        ("quit", None)]


def graph_cards():
    from desktop_app.project.feature_cards import cards_of

    entry = window.project.entry("graph")
    return cards_of(entry.result) if entry.result is not None else {}


def hover_feature():
    """Show the card of the most influential feature node that has top contexts, with room for the graph."""
    import numpy as np
    from PySide6.QtCore import Qt

    window.resizeDocks([window.docks["detailDock"]], [560], Qt.Vertical)
    view = window.detail_views["graph"]
    ex, cards = view.result.extras, graph_cards()
    for i in np.argsort(-np.asarray(ex["node_influence"], dtype=float)):
        card = cards.get((int(ex["node_layer"][i]), int(ex["node_feature"][i])))
        if ex["node_kind"][i] == "feature" and card is not None and card.top_contexts:
            view.hover_node(int(i))
            return


def tick():
    if time.time() - state["t"] > 240:
        print("timeout at step", state["i"], plan[state["i"]], flush=True)
        app.exit(3)
        return
    what, arg = plan[state["i"]]
    done = False
    if what == "wait_model":
        done = window.model_loaded is not None
        if window.message_bar.level == "error":
            print("error:", window.message_bar.text() if hasattr(window.message_bar, "text") else "?", flush=True)
    elif what == "do":
        arg()
        done = True
    elif what == "wait_run":
        done = state["ended"] is not None
        if done:
            print("ended", state["ended"], flush=True)
    elif what == "wait_cards":  # the demo graph's feature cards are built in the runner right after it is shown
        done = bool(graph_cards())
    elif what == "settle":
        state.setdefault("settle_t", time.time())
        done = time.time() - state["settle_t"] > 1.5
        if done:
            del state["settle_t"]
    elif what == "shot":
        shot(arg)
        done = True
    elif what == "quit":
        window.close()
        app.exit(0)
        return
    if done:
        state["i"] += 1
    QTimer.singleShot(100, tick)


QTimer.singleShot(500, tick)
sys.exit(app.exec())
