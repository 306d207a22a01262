"""Concurrent saves of one file (two windows, a window and `run`, parallel scripts): one complete project,
one complete .bak, never a file that fails its CRC; a writer whose version did not land is told so and its
version is kept beside the file."""
from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from faults_kit import PYTHON, ROOT, WRITERS, child_env, versioned_project

from desktop_app.project.atomic import TMP_PREFIX, SaveConflict, atomic_write, backup_path
from desktop_app.project.iwb import save_project

check_project = WRITERS["project"][2]


def _outcomes_hold(path, outcomes):
    """Every save either landed (its version is the file, the .bak or was replaced by a later one) or raised
    SaveConflict whose message says so and whose kept file holds that version."""
    landed = [v for v, kind, _ in outcomes if kind == "ok"]
    assert landed, outcomes
    print(f"{len(landed)} saves landed, {len(outcomes) - len(landed)} lost a race and were kept aside")
    for v, kind, info in outcomes:
        if kind == "conflict":
            message, kept = info
            assert "saved by another" in message and kept.name in message
            assert check_project(kept) == v
    final = check_project(path)
    assert final in landed
    assert check_project(backup_path(path)) in landed
    assert not list(path.parent.glob(TMP_PREFIX + "*"))


def test_threads_saving_one_file(tmp_path):
    path = tmp_path / "shared.iwb"
    save_project(versioned_project(0), path)
    outcomes, lock = [], threading.Lock()
    barrier = threading.Barrier(4)

    def writer(k):
        barrier.wait()
        for i in range(5):
            v = 100 * (k + 1) + i
            try:
                save_project(versioned_project(v, size=20000), path)
                kind, info = "ok", None
            except SaveConflict as err:
                kind, info = "conflict", (str(err), err.kept_at)
            with lock:
                outcomes.append((v, kind, info))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(outcomes) == 20
    _outcomes_hold(path, outcomes + [(0, "ok", None)])


PROCESS_CHILD = """
import sys
from pathlib import Path
from faults_kit import versioned_project
from desktop_app.project.atomic import SaveConflict
from desktop_app.project.iwb import save_project
path, k = Path(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()  # start together
for i in range(6):
    v = 100 * (k + 1) + i
    try:
        save_project(versioned_project(v, size=20000), path)
        print(f"{v}|ok", flush=True)
    except SaveConflict as err:
        print(f"{v}|conflict|{err.kept_at}|{err}", flush=True)
"""


def test_processes_saving_one_file(tmp_path):
    path = tmp_path / "shared.iwb"
    save_project(versioned_project(0), path)
    procs = [subprocess.Popen([PYTHON, "-c", PROCESS_CHILD, str(path), str(k)], cwd=ROOT, env=child_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in range(3)]
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outcomes = [(0, "ok", None)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        for line in out.splitlines():
            v, kind, *rest = line.split("|", 3)
            outcomes.append((int(v), kind, (rest[1], Path(rest[0])) if kind == "conflict" else None))
    assert len(outcomes) == 19
    _outcomes_hold(path, outcomes)


def test_the_losing_writer_is_told_and_keeps_its_version(tmp_path, monkeypatch):
    """Deterministic race: another program replaces the file while this save is writing its temp file."""
    from desktop_app.project import iwb

    path = tmp_path / "p.iwb"
    save_project(versioned_project(1), path)
    real = iwb.write_archive

    def slow_write(project, f):
        real(project, f)
        other = versioned_project(2)  # the other writer finishes first
        atomic_write(path, lambda g: real(other, g), backup=True, what="project")

    monkeypatch.setattr(iwb, "_write_archive", slow_write)
    mine = versioned_project(3)
    try:
        save_project(mine, path)
        raise AssertionError("the second save must not overwrite the first")
    except SaveConflict as err:
        assert "saved by another window or program" in str(err) and "\n" not in str(err)
        assert check_project(err.kept_at) == 3
    assert mine.dirty  # not marked saved: its own file was not written
    assert check_project(path) == 2 and check_project(backup_path(path)) == 1
