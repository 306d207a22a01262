"""The fault-injection tests reuse the project tests' builders (tests/project/iwb_testkit.py)."""
import sys
from pathlib import Path

_PROJECT_TESTS = str(Path(__file__).resolve().parents[1] / "project")
if _PROJECT_TESTS not in sys.path:
    sys.path.append(_PROJECT_TESTS)
