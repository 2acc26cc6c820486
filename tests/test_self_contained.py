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


def test_the_readme_module_table_names_every_module():
    """README's "How it is put together" names every module of stemref (a package folder names all of its files)."""
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("## How it is put together"):]
    table = table[: table.index("\n\n", table.index("| file |"))]
    package = ROOT / "stemref"
    unnamed = [str(path.relative_to(package)) for path in sorted(package.rglob("*.py"))
               if path.name != "__init__.py" and "__pycache__" not in path.parts
               and not re.search(rf"(?<![\w]){re.escape(path.name)}", table)
               and f"`stemref/{path.parent.relative_to(package)}/`" not in table]
    assert unnamed == []
