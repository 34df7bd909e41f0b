"""Whether two folders hold the same files, reading as little as it can.

FLUX.1 [schnell] carries [dev]'s text encoders, tokenizers and VAE byte for byte: 9.9 GB. The
loader loads them once when the files are the same, and `download-weights` links them rather than
fetching them twice. Cheapest test first: the same file names and sizes; the same file on disk (a
hard link, as `download-weights` makes, or symlinks into one blob of a Hugging Face cache); else
the bytes, compared until the first difference.
"""

from __future__ import annotations

import os
from pathlib import Path

CHUNK = 1 << 24  # 16 MiB


def same_files(first: Path, second: Path) -> bool:
    """True when both folders hold the same relative file names with the same contents."""
    first_files, second_files = _files(first), _files(second)
    if set(first_files) != set(second_files):
        return False
    pairs = [(first_files[name], second_files[name]) for name in sorted(first_files)]
    if any(a.stat().st_size != b.stat().st_size for a, b in pairs):
        return False
    return all(_same_file(a, b) or _same_bytes(a, b) for a, b in pairs)


def _files(folder: Path) -> dict[str, Path]:
    return {path.relative_to(folder).as_posix(): path for path in folder.rglob("*") if path.is_file()}


def _same_file(a: Path, b: Path) -> bool:
    """One file under two names: a hard link, or symlinks to one target."""
    return os.path.samefile(a, b)


def _same_bytes(a: Path, b: Path) -> bool:
    with a.open("rb") as first, b.open("rb") as second:
        while True:
            chunk = first.read(CHUNK)
            if chunk != second.read(CHUNK):
                return False
            if not chunk:
                return True
