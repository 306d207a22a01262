"""Every writer, crashed at every step of its save and SIGKILLed at random moments: the file (and its .bak)
always opens and holds one complete version, the old or the new."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from faults_kit import LOOP_CHILD, PYTHON, ROOT, WRITERS, child_env

from desktop_app.project import atomic
from desktop_app.project.atomic import TMP_PREFIX, backup_path


class _Crash(BaseException):
    """Stands for the process dying at this point (BaseException: no `except Exception` swallows it)."""


class _CrashingFile:
    def __init__(self, f, limit: int):
        self.f, self.limit, self.n = f, limit, 0

    def write(self, data):
        data = bytes(data)
        if self.n + len(data) > self.limit:
            self.f.write(data[: self.limit - self.n])
            raise _Crash("killed while writing")
        self.n += len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


class _CrashingOs:
    """os, except that the n-th call of `name` dies before doing anything."""

    def __init__(self, name: str, n: int):
        self.name, self.n, self.calls = name, n, 0

    def __getattr__(self, attr):
        real = getattr(os, attr)
        if attr != self.name:
            return real

        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.n:
                raise _Crash(f"killed at {attr} call {self.n}")
            return real(*args, **kwargs)
        return call


# Crash points: (what is patched, which call). The project writer's sequence is: write the temp file,
# fsync it, link the old file to a staging name, rename the staging name to .bak, rename the temp file.
CRASH_POINTS = [("write", 200), ("write", 5000), ("fsync", 1), ("link", 1), ("replace", 1), ("replace", 2),
                ("replace", 3), ("open", 2)]


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_a_crash_at_any_step_leaves_the_old_or_the_new_version(writer, tmp_path, monkeypatch):
    name, write, check, keeps_bak = WRITERS[writer]
    path = tmp_path / name
    write(path, 1)
    write(path, 2)  # now there is a file and (for projects) a .bak
    held = 0
    for point, n in CRASH_POINTS:
        with monkeypatch.context() as m:
            if point == "write":
                real_open = atomic._open_tmp

                def crashing_open(target, real_open=real_open, n=n):
                    f, tmp = real_open(target)
                    return _CrashingFile(f, n), tmp
                m.setattr(atomic, "_open_tmp", crashing_open)
            else:
                m.setattr(atomic, "os", _CrashingOs(point, n))
            try:
                write(path, 3)
                crashed = False
            except _Crash:
                crashed = True
        got = check(path)
        assert got in (2, 3) and (crashed or got == 3), (point, n, got)
        bak = backup_path(path)
        if keeps_bak:
            assert check(bak) in (1, 2, 3)
        assert not list(tmp_path.glob(TMP_PREFIX + "*")), (point, n)  # the failed save cleaned up after itself
        write(path, 2)
        held += 1
    assert held == len(CRASH_POINTS)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_sigkill_at_random_moments(writer, tmp_path):
    name, _, check, keeps_bak = WRITERS[writer]
    path = tmp_path / name
    rng = random.Random(writer)
    saved: set[int] = set()
    version = 0
    for _ in range(2):  # bounded: two kills per writer keep the module fast
        child = subprocess.Popen([PYTHON, "-c", LOOP_CHILD, writer, str(path), str(version)], cwd=ROOT,
                                 env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        first = child.stdout.readline()
        assert first.strip(), child.stderr.read()
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        printed = [int(x) for x in [first] + child.stdout.read().split()]
        child.stdout.close()
        child.stderr.close()
        saved.update(printed)
        in_flight = printed[-1] + 1  # its rename may have happened just before the kill
        saved.add(check(path))
        assert saved <= set(range(in_flight + 1))
        if keeps_bak and backup_path(path).exists():
            assert check(backup_path(path)) in saved | {in_flight}
        version = in_flight + 1
