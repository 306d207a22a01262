"""Helpers for the command-line tests: experiment files, running the CLI in a subprocess."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# One template, two names swapped at one position: clean and corrupted have the same token length.
CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPTED = "When Mary and John went to the store, Mary gave a drink to"


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def experiment_dict(model_path, analyses, **prompt_changes) -> dict:
    prompts = {"clean": CLEAN, "corrupted": CORRUPTED, "answer": " Mary", "wrong_answer": " John"}
    prompts.update(prompt_changes)
    return {"version": 1, "model": {"path": str(model_path), "dtype": "float32", "device": "cpu"},
            "prompts": prompts, "analyses": analyses}


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


def run_cli(args, cwd=None, timeout=300, **popen):
    """`python -m desktop_app ARGS` in a subprocess; returns the CompletedProcess (text mode)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), QT_QPA_PLATFORM="offscreen", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "desktop_app", *args], cwd=cwd or REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, **popen)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]
