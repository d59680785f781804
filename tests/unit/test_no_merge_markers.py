"""No file of the repository holds a merge's conflict markers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MARKER = re.compile(rb"^(<{7}|>{7})( |$)|^={7}$", re.MULTILINE)
NOT_OURS = {".git", ".venv", ".venv-clients", "build", "node_modules", "__pycache__"}


def _files() -> list[Path]:
    """What git tracks; without git (a copy of the sources), every file but built ones."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
        ).stdout.split(b"\0")
        return [REPO / name.decode() for name in listed if name]
    except (OSError, subprocess.CalledProcessError):
        return [
            path
            for path in REPO.rglob("*")
            if not NOT_OURS.intersection(path.relative_to(REPO).parts)
        ]


def test_no_file_holds_conflict_markers() -> None:
    marked = [
        str(path.relative_to(REPO))
        for path in _files()
        if path.is_file() and MARKER.search(path.read_bytes())
    ]
    assert marked == []
