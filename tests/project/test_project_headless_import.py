import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CODE = """
import sys
for blocked in ("PySide6", "pyqtgraph", "torch", "transformers"):
    sys.modules[blocked] = None
import desktop_app.project
from desktop_app.project import (atomic, autosave, data_export, document, execute, experiment, iwb, kinds,
                                 recent, specs, undo)
kinds.load()
assert len(kinds.all_kinds()) >= 5
loaded = [m for m in ("PySide6", "pyqtgraph", "torch", "transformers") if sys.modules.get(m) is not None]
assert not loaded, loaded
print("ok")
"""


def test_project_imports_without_qt_or_torch():
    out = subprocess.run([sys.executable, "-c", CODE], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
