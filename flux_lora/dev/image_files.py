"""The files `cog build` puts in the image: the repository less what `.dockerignore` excludes.

Read with the subset of Docker's rules `.dockerignore` keeps to: one path or glob a line, relative
to the repository root, `**/` for any depth; a pattern that matches a folder excludes all of it.
Exceptions (`!`) are refused rather than half understood.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

IGNORE_FILE = ".dockerignore"


def ignore_patterns(root: Path) -> list[str]:
    lines = (Path(root) / IGNORE_FILE).read_text().splitlines()
    patterns = [
        line.strip().strip("/") for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    exceptions = [p for p in patterns if p.startswith("!")]
    if exceptions:
        raise ValueError(f"{IGNORE_FILE}: exceptions like {exceptions[0]!r} are not supported here")
    return patterns


def is_excluded(relative: str, patterns: list[str]) -> bool:
    """Whether the file at `relative` (a POSIX path) or a folder above it matches a pattern. As in
    Docker, `*` stays within one path component."""
    parts = relative.split("/")
    for pattern in patterns:
        wanted = pattern.split("/")
        if wanted[0] == "**":
            tail = wanted[1:]
            starts = range(len(parts) - len(tail) + 1)
            if any(_component_match(parts[s : s + len(tail)], tail) for s in starts):
                return True
        elif len(wanted) <= len(parts) and _component_match(parts[: len(wanted)], wanted):
            return True
    return False


def _component_match(parts: list[str], pattern: list[str]) -> bool:
    return len(parts) == len(pattern) and all(
        fnmatch.fnmatchcase(p, w) for p, w in zip(parts, pattern, strict=True)
    )


def image_files(root: Path) -> list[str]:
    """Every file under `root` the image receives, as sorted POSIX paths relative to it."""
    root = Path(root)
    patterns = ignore_patterns(root)
    kept = []
    for folder, subfolders, names in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        here = "" if relative == "." else relative
        # Prune excluded folders: .venv and .git alone hold tens of thousands of files.
        subfolders[:] = [d for d in subfolders if not is_excluded(f"{here}/{d}".lstrip("/"), patterns)]
        kept += [
            path
            for path in (f"{here}/{name}".lstrip("/") for name in names)
            if not is_excluded(path, patterns)
        ]
    return sorted(kept)
