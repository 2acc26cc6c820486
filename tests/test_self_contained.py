"""A clone of the repository is all a reader has: no file may point at material outside it."""
from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUFFIXES = {".py", ".md", ".toml", ".cfg", ".txt", ".svg", ".yaml", ".yml"}
SKIP = {".git", ".venv", "weights", "build", "dist", "__pycache__", ".pytest_cache"}
# the development checkout's sibling folder of notes and clips; spelled in pieces so this file does not match
OUTSIDE = ("../" + "shared", "shared/" + "notes", "shared/" + "videos", "shared/" + "papers")


def repository_files():
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIP and not d.endswith(".egg-info")]  # not walked
        yield from (Path(folder) / f for f in files if Path(f).suffix in SUFFIXES)


def test_no_file_points_outside_the_repository():
    offending = [f"{path.relative_to(ROOT)}: {needle}" for path in repository_files()
                 for needle in OUTSIDE if needle in path.read_text(encoding="utf-8", errors="replace")]
    assert offending == []
