"""A durable on-disk cache of downloaded LoRA files, shared safely between processes.

Layout under the root:
    entries/<key>/lora.safetensors, entries/<key>/meta.json   one complete entry per directory
    .staging/                                                 downloads in progress, entries being built or removed
    .locks/<key>.lock                                         one inter-process lock per key

An entry directory is assembled in .staging/ and renamed into entries/ in one step, so a reader
sees either a whole entry (file and meta) or none. Recency is the meta file's mtime.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import filelock

from flux_lora.errors import CacheError, ConfigError

DEFAULT_MAX_GB = 20.0  # when FLUX_LORA_CACHE_MAX_GB is unset
GB = 10**9
KEY_CHARS = 32
FILE_NAME = "lora.safetensors"
META_NAME = "meta.json"
# Keys become path components: no separators, no dots, so no way out of the root.
_KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


@dataclass(frozen=True)
class CacheEntry:
    path: Path  # the complete .safetensors file
    meta: dict  # JSON-able metadata stored with it


class LoraCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        # Recency stamps from this instance strictly increase, even within one clock tick.
        self._last_stamp = 0

    @classmethod
    def from_env(cls, default_root: Path) -> LoraCache:
        root = os.environ.get("FLUX_LORA_CACHE_DIR") or default_root
        raw = os.environ.get("FLUX_LORA_CACHE_MAX_GB", "").strip()
        gigabytes = DEFAULT_MAX_GB
        if raw:
            try:
                gigabytes = float(raw)
            except ValueError:
                gigabytes = math.nan
            if not math.isfinite(gigabytes) or gigabytes < 0:
                raise ConfigError(
                    f"FLUX_LORA_CACHE_MAX_GB={raw!r} is not a size: set it to a number of gigabytes >= 0 "
                    f"(e.g. 20 or 2.5), or unset it for the default of {DEFAULT_MAX_GB:g}"
                )
        return cls(Path(root), int(gigabytes * GB))

    def key_for(self, text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_CHARS]

    def get(self, key: str) -> CacheEntry | None:
        entry_dir = self._entry_dir(key)
        try:
            meta = json.loads((entry_dir / META_NAME).read_text(encoding="utf-8"))
            if not (entry_dir / FILE_NAME).is_file():
                return None
            # A folder shared with another user may refuse utime: still a hit, just not refreshed.
            with suppress(PermissionError):
                self._touch(entry_dir / META_NAME)
        except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
            # Absent, or evicted by another process between the reads: a miss either way.
            return None
        return CacheEntry(path=entry_dir / FILE_NAME, meta=meta)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        # Not reentrant: a second lock() on the same key in the same process waits for the first.
        with self._file_lock(key):
            yield

    @contextmanager
    def staging(self, key: str) -> Iterator[Path]:
        self._check_key(key)
        staging_dir = self._mkdir(self.root / ".staging")
        path = staging_dir / f"{key}.{uuid.uuid4().hex}.part"
        try:
            yield path
        finally:
            path.unlink(missing_ok=True)

    def commit(self, key: str, staged: Path, meta: dict) -> CacheEntry:
        """Call while holding lock(key); `staged` must be on the cache's filesystem (see staging())."""
        self._check_key(key)
        entries_dir = self._mkdir(self.root / "entries")
        building = self._mkdir(self.root / ".staging") / f"{key}.{uuid.uuid4().hex}.entry"
        try:
            building.mkdir()
            (building / META_NAME).write_text(json.dumps(meta), encoding="utf-8")
            os.replace(staged, building / FILE_NAME)
            self._touch(building / META_NAME)
            self._remove_entry(key)  # a directory rename cannot replace a non-empty directory
            os.rename(building, entries_dir / key)
        except OSError as err:
            shutil.rmtree(building, ignore_errors=True)
            with suppress(OSError):
                Path(staged).unlink(missing_ok=True)
            if err.errno == errno.ENOSPC:
                raise CacheError(
                    f"disk full while storing LoRA {key} in {self.root}: "
                    "free space there or lower FLUX_LORA_CACHE_MAX_GB"
                ) from err
            raise CacheError(f"could not store LoRA {key} in {self.root}: {err.strerror or err}") from err
        self.evict(keep=key)
        return CacheEntry(path=entries_dir / key / FILE_NAME, meta=meta)

    def evict(self, keep: str | None = None) -> list[str]:
        """Remove least-recently-used entries (never `keep`, never a locked one) until under budget."""
        sizes = {key: self._size(key) for key in self.entries()}
        total = sum(sizes.values())
        evicted = []
        for key in sizes:  # least recently used first
            if total <= self.max_bytes:
                break
            if key == keep:
                continue
            try:
                # Someone holding the key's lock may be reading the file: leave it for next time.
                with self._file_lock(key, timeout=0):
                    self._remove_entry(key)
            except filelock.Timeout:
                continue
            total -= sizes[key]
            evicted.append(key)
        return evicted

    def total_bytes(self) -> int:
        return sum(self._size(key) for key in self.entries())

    def entries(self) -> list[str]:
        stamped = []
        for entry_dir in self._list(self.root / "entries"):
            try:
                if (entry_dir / FILE_NAME).is_file():
                    stamped.append(((entry_dir / META_NAME).stat().st_mtime_ns, entry_dir.name))
            except FileNotFoundError:
                continue  # incomplete, or removed while listing
        return [key for _, key in sorted(stamped)]  # ties: by key, so the order is deterministic

    def clean_stale_staging(self, older_than_s: float = 3600) -> int:
        # A live download keeps bumping its file's mtime, so age since last write spares it.
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self._list(self.root / ".staging"):
            try:
                if path.lstat().st_mtime > cutoff:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:
                continue  # another process cleaned it first
            removed += 1
        return removed

    # Internals.

    def _check_key(self, key: str) -> None:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"cache key {key!r} is not a key_for() key")

    def _entry_dir(self, key: str) -> Path:
        self._check_key(key)
        return self.root / "entries" / key

    def _file_lock(self, key: str, timeout: float = -1) -> filelock.FileLock:
        self._check_key(key)
        locks_dir = self._mkdir(self.root / ".locks")
        # Lock files are never deleted: unlinking one while held would split waiters across inodes.
        return filelock.FileLock(locks_dir / f"{key}.lock", timeout=timeout)

    def _remove_entry(self, key: str) -> None:
        # Rename out of entries/ first, so no reader ever sees a half-deleted entry.
        trash = self._mkdir(self.root / ".staging") / f"{key}.{uuid.uuid4().hex}.evicted"
        try:
            os.rename(self._entry_dir(key), trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def _touch(self, path: Path) -> None:
        stamp = max(time.time_ns(), self._last_stamp + 1)
        self._last_stamp = stamp
        os.utime(path, ns=(stamp, stamp))

    def _size(self, key: str) -> int:
        try:
            return (self._entry_dir(key) / FILE_NAME).stat().st_size
        except FileNotFoundError:
            return 0

    @staticmethod
    def _list(folder: Path) -> list[Path]:
        try:
            return sorted(folder.iterdir())
        except FileNotFoundError:
            return []

    @staticmethod
    def _mkdir(folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
