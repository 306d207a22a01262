"""The concept modules keep the layer rule: engine without Qt; the kinds (project) without Qt or torch."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ENGINE = """
import sys
for blocked in ("PySide6", "pyqtgraph"):
    sys.modules[blocked] = None
from desktop_app.engine import (activations_dataset, control_vector, edits, logistic, probes, stats, steering,
                                tcav, text_data)
print("ok")
"""

KINDS = """
import sys
for blocked in ("PySide6", "pyqtgraph", "torch", "transformers"):
    sys.modules[blocked] = None
from desktop_app.engine import stats, text_data
from desktop_app.project.kinds import probe, steering, tcav
from desktop_app.project import kinds
assert {"probe", "tcav", "steering_vector", "steering"} <= {r.kind for r in kinds.all_kinds()}
print("ok")
"""


def test_concept_modules_import_headless():
    for code in (ENGINE, KINDS):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "ok"
