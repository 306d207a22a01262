from desktop_app.project.autosave import discard_recovery, find_recovery, write_recovery
from desktop_app.project.iwb import save_project
from desktop_app.project.recent import RecentProjects
from desktop_app.project.specs import Prompts

from iwb_testkit import assert_projects_equal


def test_recovery_cycle(project, tmp_path):
    folder = tmp_path / "recovery"
    assert find_recovery(folder) is None
    user_file = save_project(project, tmp_path / "mine.iwb")
    project.set_prompts(Prompts("typed after the last save"))
    write_recovery(project, folder)
    assert project.dirty  # autosave is not a save
    rec = find_recovery(folder)
    assert rec is not None and rec.original_path == user_file
    recovered = rec.load()
    assert_projects_equal(project, recovered)
    assert recovered.dirty and recovered.path == user_file
    discard_recovery(folder)
    assert find_recovery(folder) is None
    discard_recovery(folder)  # twice is fine


def test_recovery_default_folder_is_overridable_by_env(project, tmp_path, monkeypatch):
    monkeypatch.setenv("INTERP_WORKBENCH_DATA_DIR", str(tmp_path / "data"))
    path = write_recovery(project)
    assert path.parent == tmp_path / "data" / "recovery"
    assert find_recovery().path == path


def test_recent_projects(tmp_path):
    recent = RecentProjects(tmp_path / "cfg" / "recent.json", limit=3)
    assert recent.items() == []
    files = []
    for i in range(5):
        f = tmp_path / f"p{i}.iwb"
        f.write_bytes(b"x")
        files.append(f.resolve())
        recent.add(f)
    recent.add(files[3])
    assert recent.items() == [files[3], files[4], files[2]]
    files[4].unlink()
    assert recent.items() == [files[3], files[2]]
    recent.remove(files[3])
    assert recent.items(existing_only=False) == [files[4], files[2]]
    (tmp_path / "cfg" / "recent.json").write_text("{broken")
    assert recent.items() == []
