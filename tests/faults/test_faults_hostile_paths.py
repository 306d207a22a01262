"""Hostile folders: symlinks planted where a save writes, pipes (FIFOs) where a file is read, names as long
as the file system allows. Nothing is written through a link, nothing waits on a pipe, long names work."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

import pytest
from faults_kit import versioned_project
from iwb_testkit import make_project

from desktop_app.engine.errors import ModelLoadError, ProjectFileError, SAEError, SpecError
from desktop_app.project import atomic, autosave
from desktop_app.project.atomic import backup_path, name_max
from desktop_app.project.iwb import load_project, save_project
from desktop_app.project.recent import RecentProjects

check_project = __import__("faults_kit").WRITERS["project"][2]


@contextlib.contextmanager
def no_hang(seconds=10):
    """Fail instead of hanging forever when a reader waits on a pipe."""
    def alarm(signum, frame):
        raise AssertionError(f"still waiting after {seconds} s: a reader blocked on a pipe")
    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_symlink_at_the_old_temp_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    path = tmp_path / "p.iwb"
    os.symlink(victim, tmp_path / "p.iwb.tmp")
    save_project(make_project(), path)
    assert victim.read_text() == "another user's file"


def test_a_symlink_planted_at_the_next_temp_name_is_skipped(tmp_path, monkeypatch):
    victim = tmp_path / "victim.txt"
    victim.write_text("another user's file")
    names = iter(["planted"] * 3)
    real = atomic.secrets.token_hex
    monkeypatch.setattr(atomic.secrets, "token_hex", lambda n: next(names, None) or real(n))
    os.symlink(victim, tmp_path / f"{atomic.TMP_PREFIX}planted.tmp")
    save_project(make_project(), tmp_path / "p.iwb")  # O_EXCL refuses the planted name; the next one is used
    assert victim.read_text() == "another user's file"
    assert load_project(tmp_path / "p.iwb").prompts.clean == "When Mary and John"


def test_symlinks_at_the_target_and_the_backup_are_replaced_not_written_through(tmp_path):
    victim, victim_bak = tmp_path / "victim.txt", tmp_path / "victim_bak.txt"
    victim.write_text("keep me")
    victim_bak.write_text("keep me too")
    path = tmp_path / "p.iwb"
    os.symlink(victim, path)
    os.symlink(victim_bak, backup_path(path))
    save_project(versioned_project(1), path)
    save_project(versioned_project(2), path)
    assert victim.read_text() == "keep me" and victim_bak.read_text() == "keep me too"
    assert check_project(path) == 2 and check_project(backup_path(path)) == 1


def test_new_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        save_project(make_project(), tmp_path / "p.iwb")
    finally:
        os.umask(old)
    assert (tmp_path / "p.iwb").stat().st_mode & 0o777 == 0o644


def _fifo(path):
    os.mkfifo(path)
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_pipes_are_refused_not_waited_on(tmp_path):
    import numpy as np
    from safetensors.numpy import save_file

    from desktop_app.engine.loading import load_model
    from desktop_app.engine.sae.formats import load_sae
    from desktop_app.project.experiment import load_experiment

    held = []
    with no_hang():
        with pytest.raises(ProjectFileError, match="pipe"):
            load_project(_fifo(tmp_path / "p.iwb"))
        held.append("project")
        with pytest.raises(SpecError, match="pipe"):
            load_experiment(_fifo(tmp_path / "e.json"))
        held.append("experiment")
        rec = tmp_path / "rec"
        autosave.write_recovery(make_project(), rec)
        (rec / autosave.RECOVERY_META).unlink()
        _fifo(rec / autosave.RECOVERY_META)
        assert autosave.find_recovery(rec) is not None  # the note is skipped; the recovery is still offered
        held.append("recovery note")
        assert RecentProjects(_fifo(tmp_path / "recent.json")).items() == []
        held.append("recent list")
        for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
            folder = tmp_path / f"m-{name}"  # a model folder whose files are fine up to the pipe
            folder.mkdir()
            (folder / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
            save_file({"w": np.zeros(4, dtype=np.float32)}, str(folder / "model.safetensors"))
            (folder / name).unlink(missing_ok=True)
            _fifo(folder / name)
            with pytest.raises(ModelLoadError, match="pipe"):
                load_model(folder)
            held.append(name)
        with pytest.raises(ModelLoadError, match="pipe"):
            load_model(_fifo(tmp_path / "model.gguf"))
        held.append("gguf")
        with pytest.raises(SAEError, match="pipe"):
            load_sae(_fifo(tmp_path / "sae.safetensors"), hook_name="blocks.0.hook_resid_post")
        held.append("sae")
        with pytest.raises(ProjectFileError, match="pipe"):
            save_project(make_project(), _fifo(tmp_path / "out.iwb"))
        held.append("save over a pipe")
    assert len(held) == 10


def test_file_names_as_long_as_the_file_system_allows(tmp_path):
    limit = name_max(tmp_path)
    path = tmp_path / ("p" * (limit - 4) + ".iwb")
    save_project(versioned_project(1), path)
    save_project(versioned_project(2), path)  # the .bak name is shortened to fit
    assert check_project(path) == 2
    assert check_project(backup_path(path)) == 1 and len(backup_path(path).name.encode()) <= limit
    wide = tmp_path / ("é" * ((limit - 4) // 2) + ".iwb")  # two bytes per character
    save_project(versioned_project(3), wide)
    save_project(versioned_project(4), wide)
    assert check_project(backup_path(wide)) == 3
    with pytest.raises(ProjectFileError, match="longer than") as err:
        save_project(make_project(), tmp_path / ("q" * (limit + 1)))
    assert "\n" not in str(err.value)


def test_a_corrupt_recovery_note_does_not_stop_the_window(tmp_path):
    rec = tmp_path / "rec"
    autosave.write_recovery(make_project(), rec)
    note = rec / autosave.RECOVERY_META
    for text in ("{not json", "[" * 100_000, json.dumps({"original_path": 5, "saved_at": "soon"}),
                 json.dumps({"original_path": "a\u0000b", "saved_at": 1e308}), '{"saved_at": ' + "9" * 5000 + "}",
                 json.dumps({"original_path": ["x"], "saved_at": float("-1")}), "\udcff"):
        note.write_bytes(text.encode("utf-8", "surrogateescape"))
        found = autosave.find_recovery(rec)
        assert found is not None and found.original_path is None
        assert 0 <= found.saved_at < 1e11  # time.localtime(saved_at) works in the window
    note.write_bytes(b"x" * (1 << 20))
    assert autosave.find_recovery(rec) is not None


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_an_unwritable_folder_is_one_sentence(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(ProjectFileError, match="not writable"):
            save_project(make_project(), folder / "p.iwb")
    finally:
        folder.chmod(0o700)
