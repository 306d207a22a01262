"""The recent-projects list: a small JSON file in platformdirs' user config dir (or `path=`, or the
INTERP_WORKBENCH_CONFIG_DIR folder). A damaged list is treated as empty; it is never the user's work."""
from __future__ import annotations

import json
import os
from pathlib import Path

from desktop_app.engine.bounded_io import loads_json, read_regular_bytes
from desktop_app.project.atomic import atomic_write

APP_NAME = "interp-workbench"


def config_dir() -> Path:
    override = os.environ.get("INTERP_WORKBENCH_CONFIG_DIR")
    if override:
        return Path(override)
    import platformdirs
    return Path(platformdirs.user_config_dir(APP_NAME, appauthor=False))


class RecentProjects:
    def __init__(self, path: str | os.PathLike | None = None, limit: int = 10):
        self.path = Path(path) if path is not None else config_dir() / "recent.json"
        self.limit = limit

    def _read(self) -> list[str]:
        try:
            data = loads_json(read_regular_bytes(self.path, 1 << 20), max_depth=4)  # never waits on a pipe
        except (OSError, ValueError):
            return []
        items = data.get("recent") if isinstance(data, dict) else None
        return [p for p in items if isinstance(p, str)] if isinstance(items, list) else []

    def _write(self, items: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"recent": items[: self.limit]}, indent=1)
        atomic_write(self.path, lambda f: f.write(text.encode("utf-8")), what="recent-projects list")

    def items(self, existing_only: bool = True) -> list[Path]:
        """Most recent first; files that have since disappeared are left out unless existing_only=False."""
        paths = [Path(p) for p in self._read()]
        return [p for p in paths if p.is_file()] if existing_only else paths

    def add(self, project_path: str | os.PathLike) -> None:
        p = str(Path(project_path).resolve())
        self._write([p] + [q for q in self._read() if q != p])

    def remove(self, project_path: str | os.PathLike) -> None:
        p = str(Path(project_path).resolve())
        self._write([q for q in self._read() if q != p])

    def clear(self) -> None:
        self._write([])
