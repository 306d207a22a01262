"""Shared pieces of the fault-injection tests: every writer of the app as (name, write(path, version),
check(path) -> version), so that one test can crash, kill or race each of them the same way."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def versioned_project(version: int, size: int = 2000):
    from desktop_app.engine.results import AnalysisResult
    from desktop_app.project.document import Project
    from desktop_app.project.specs import ActivationPatchingSpec, Prompts

    p = Project(prompts=Prompts(f"version {version}"))
    p.add_analysis(ActivationPatchingSpec("big"))
    values = np.full((size // 50, 50), version, dtype=np.float32)
    p.set_result("big", AnalysisResult("big", "activation_patching", {}, ["layer", "position"], values,
                                       extras={"x": np.full(size, version, dtype=np.int64)}))
    p.set_view("version", version)
    return p


def _check_project(path: Path) -> int:
    from desktop_app.project.iwb import load_project

    p = load_project(path)
    v = p.view_state["version"]
    r = p.entry("big").result
    assert np.all(r.values == v) and np.all(r.extras["x"] == v) and p.prompts.clean == f"version {v}", path
    return v


def _write_project(path: Path, version: int) -> None:
    from desktop_app.project.iwb import save_project

    save_project(versioned_project(version), path)


def _write_recovery(path: Path, version: int) -> None:
    from desktop_app.project.autosave import RECOVERY_FILE, write_recovery

    assert path.name == RECOVERY_FILE
    write_recovery(versioned_project(version), path.parent)


def _write_experiment(path: Path, version: int) -> None:
    from desktop_app.project.experiment import Experiment, save_experiment
    from desktop_app.project.specs import ModelRef, Prompts

    save_experiment(Experiment(ModelRef("/models/m"), Prompts(f"version {version} " + "x" * 4000)), path)


def _check_experiment(path: Path) -> int:
    from desktop_app.project.experiment import load_experiment

    return int(load_experiment(path).prompts.clean.split()[1])


def _result(version: int):
    return versioned_project(version).entry("big").result


def _write_npz(path: Path, version: int) -> None:
    from desktop_app.project.data_export import export_npz

    export_npz(_result(version), path)


def _check_npz(path: Path) -> int:
    with np.load(path, allow_pickle=False) as data:
        values = data["values"]
    v = int(values.flat[0])
    assert np.all(values == v)
    return v


def _write_csv(path: Path, version: int) -> None:
    from desktop_app.project.data_export import export_csv

    export_csv(_result(version), path)


def _check_csv(path: Path) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].startswith("layer,") and len(lines) == 2001
    values = {line.rsplit(",", 1)[1] for line in lines[1:]}
    assert len(values) == 1
    return int(float(values.pop()))


def _write_recent(path: Path, version: int) -> None:
    from desktop_app.project.recent import RecentProjects

    RecentProjects(path, limit=50)._write([f"/p/version-{version}-{i}.iwb" for i in range(40)])


def _check_recent(path: Path) -> int:
    items = json.loads(path.read_text(encoding="utf-8"))["recent"]
    versions = {int(item.split("-")[1]) for item in items}
    assert len(items) == 40 and len(versions) == 1
    return versions.pop()


# name -> (file name, write(path, version), check(path) -> version, keeps a .bak)
WRITERS = {
    "project": ("p.iwb", _write_project, _check_project, True),
    "recovery": ("recovery.iwb", _write_recovery, _check_project, False),
    "experiment": ("e.json", _write_experiment, _check_experiment, False),
    "npz": ("r.npz", _write_npz, _check_npz, False),
    "csv": ("r.csv", _write_csv, _check_csv, False),
    "recent": ("recent.json", _write_recent, _check_recent, False),
}


def child_env() -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + str(Path(__file__).parent), OMP_NUM_THREADS="1",
                OPENBLAS_NUM_THREADS="1")


# A child process that writes versions start, start+1, ... of one writer's file until it is killed,
# printing each version after its write returned.
LOOP_CHILD = """
import sys
from pathlib import Path
import faults_kit
name, path, version = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
write = faults_kit.WRITERS[name][1]
while True:
    write(path, version)
    print(version, flush=True)
    version += 1
"""

PYTHON = sys.executable
