"""Where the bundled demo lives: resources/demo/ in a source checkout, or inside a PyInstaller bundle.

Qt-free and torch-free. INTERP_WORKBENCH_DEMO_DIR overrides the location (tests, custom installs).
The demo folder holds model/ (a Hugging Face GPT-2 folder), sae/ (an SAELens folder), transcoders/ (a
circuit-tracer set), corpus.txt (the feature cards' corpus) and experiment.json;
packaging/train_demo.py builds them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

DEMO_DIR_ENV = "INTERP_WORKBENCH_DEMO_DIR"


def resources_dir() -> Path:
    """The `resources` folder: next to the frozen executable's data (sys._MEIPASS) or at the repository root."""
    bundle = getattr(sys, "_MEIPASS", None)
    if getattr(sys, "frozen", False) and bundle:
        return Path(bundle) / "resources"
    return Path(__file__).resolve().parents[1] / "resources"


def demo_dir() -> Path:
    override = os.environ.get(DEMO_DIR_ENV)
    return Path(override).expanduser() if override else resources_dir() / "demo"


def demo_experiment_path() -> Path:
    return demo_dir() / "experiment.json"


def demo_model_dir() -> Path:
    return demo_dir() / "model"


def demo_sae_dir() -> Path:
    return demo_dir() / "sae"


def demo_corpus_path() -> Path:
    """corpus.txt: the default corpus for the demo graph's feature cards."""
    return demo_dir() / "corpus.txt"


def demo_transcoders_dir() -> Path:
    return demo_dir() / "transcoders"


def icon_path(kind: str = "png") -> Path:
    """The application icon, `png` (256x256) or `svg`."""
    return resources_dir() / f"icon.{kind}"
