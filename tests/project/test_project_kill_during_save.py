"""SIGKILL a process in the middle of saving, again and again: the file on disk must always open and hold
one complete saved version (never a mix, never a half-written zip)."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from desktop_app.project.iwb import load_project

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import sys
import numpy as np
from desktop_app.engine.results import AnalysisResult
from desktop_app.project.document import Project
from desktop_app.project.iwb import save_project
from desktop_app.project.specs import ActivationPatchingSpec, Prompts

path, version = sys.argv[1], int(sys.argv[2])
p = Project(prompts=Prompts("kill test"))
p.add_analysis(ActivationPatchingSpec("big"))
while True:
    values = np.full((250, 1000), version, dtype=np.float32)  # 1 MB per array
    extras = {f"x{j}": np.full(250_000, version, dtype=np.float32) for j in range(3)}
    p.set_result("big", AnalysisResult("big", "activation_patching", {}, ["layer", "position"], values,
                                       extras=extras))
    p.set_view("version", version)
    save_project(p, path)
    print(version, flush=True)
    version += 1
"""


def check_version(path: Path, allowed: set[int]) -> int:
    p = load_project(path)
    v = p.view_state["version"]
    assert v in allowed, (path, v)
    r = p.entry("big").result
    assert np.all(r.values == v) and all(np.all(a == v) for a in r.extras.values())
    return v


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_during_save_never_leaves_a_broken_file(tmp_path):
    rng = random.Random(1234)
    path = tmp_path / "victim.iwb"
    saved: set[int] = set()
    next_version = 0
    deadline = time.monotonic() + 40
    for round_ in range(15):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(next_version)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = child.stdout.readline()  # wait for one complete save in this round
        assert first.strip(), child.stderr.read()
        time.sleep(rng.uniform(0.0, 0.25))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        printed = [int(line) for line in [first] + child.stdout.read().split()]
        child.stdout.close()
        child.stderr.close()
        saved.update(printed)
        # The save after the last printed one may have completed its rename just before the kill.
        in_flight = printed[-1] + 1
        v = check_version(path, saved | {in_flight})
        saved.add(v)
        bak = path.with_name(path.name + ".bak")
        if bak.exists():
            check_version(bak, saved | {in_flight})
        next_version = in_flight + 1
        assert time.monotonic() < deadline, f"too slow: {round_} rounds"
