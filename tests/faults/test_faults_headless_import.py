"""The new checking modules keep the layer rule: project and engine import without Qt, and the project-side
readers and writers without torch."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
for blocked in ("PySide6", "pyqtgraph", "torch", "transformers"):
    sys.modules[blocked] = None
from desktop_app.project import atomic, autosave, doc_checks, experiment, iwb, recent, safe_output, text_safety
from desktop_app.engine import bounded_io
import desktop_app.cli_safety
loaded = [m for m in ("PySide6", "pyqtgraph", "torch", "transformers") if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""


def test_checking_modules_import_without_qt_or_torch():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
