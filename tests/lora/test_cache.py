"""The LoRA cache on a real filesystem, with real processes for crashes and concurrent downloads."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from flux_lora.errors import CacheError, ConfigError
from flux_lora.lora.cache import DEFAULT_MAX_GB, CacheEntry, LoraCache
from flux_lora.models.layout import REPO_ROOT

REPO = REPO_ROOT


def make_cache(root: Path, max_bytes: int = 10**9) -> LoraCache:
    return LoraCache(root, max_bytes)


def put(cache: LoraCache, name: str, size: int = 100, meta: dict | None = None) -> CacheEntry:
    key = cache.key_for(name)
    with cache.lock(key), cache.staging(key) as staged:
        staged.write_bytes(name.encode()[:1] * size)
        return cache.commit(key, staged, meta if meta is not None else {"name": name})


def child(script: str, *args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args], env=env, text=True, **kwargs
    )


def staging_files(root: Path) -> list[Path]:
    return sorted((root / ".staging").iterdir()) if (root / ".staging").exists() else []


def test_commit_then_get_returns_file_and_meta(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    meta = {"source": "huggingface.co/owner/repo", "trigger_word": "TOK"}
    committed = put(cache, "a-lora", size=123, meta=meta)
    entry = cache.get(cache.key_for("a-lora"))
    assert entry == committed
    assert entry.path.suffix == ".safetensors"
    assert entry.path.read_bytes() == b"a" * 123
    assert entry.meta == meta
    assert cache.entries() == [cache.key_for("a-lora")]
    # A fresh instance finds it too: the entry lives on disk, not in the object.
    assert make_cache(tmp_path).get(cache.key_for("a-lora")) == committed


def test_get_of_unknown_key_is_none(tmp_path: Path) -> None:
    cache = make_cache(tmp_path / "not-created-yet")
    assert cache.get(cache.key_for("nothing")) is None
    assert cache.entries() == []
    assert cache.total_bytes() == 0


def test_commit_again_replaces_the_entry(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    put(cache, "x-lora", size=10, meta={"v": 1})
    key = cache.key_for("x-lora")
    with cache.lock(key), cache.staging(key) as staged:
        staged.write_bytes(b"new")
        cache.commit(key, staged, {"v": 2})
    entry = cache.get(key)
    assert entry is not None
    assert entry.path.read_bytes() == b"new"
    assert entry.meta == {"v": 2}
    assert cache.entries() == [key]
    assert staging_files(tmp_path) == []


def test_key_for_is_a_stable_hash_that_hides_the_text(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    key = cache.key_for("owner/repo/lora.safetensors")
    assert key == cache.key_for("owner/repo/lora.safetensors")
    assert key != cache.key_for("owner/repo/other.safetensors")
    assert len(key) == 32
    assert set(key) <= set("0123456789abcdef")
    with pytest.raises(ValueError, match="key"):
        cache.get("../escape")


def test_uncommitted_staging_is_invisible_and_removed_on_error(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    key = cache.key_for("half")
    with pytest.raises(RuntimeError, match="download failed"), cache.staging(key) as staged:
        assert staged.parent.resolve().is_relative_to(tmp_path.resolve())  # same filesystem
        staged.write_bytes(b"partial")
        assert cache.get(key) is None
        assert cache.entries() == []
        assert cache.total_bytes() == 0
        raise RuntimeError("download failed")
    assert not staged.exists()
    assert staging_files(tmp_path) == []


def test_staging_paths_are_unique_and_removed_without_commit(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    key = cache.key_for("same")
    with cache.staging(key) as first, cache.staging(key) as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert not first.exists()
    assert not second.exists()


CRASH_CHILD = """
    import sys, time
    from pathlib import Path
    from flux_lora.lora.cache import LoraCache

    cache = LoraCache(Path(sys.argv[1]), 10**9)
    key = cache.key_for("crashing-lora")
    with cache.lock(key), cache.staging(key) as staged, open(staged, "wb") as f:
        f.write(b"x" * 1000)  # half of a 2000-byte file
        f.flush()
        print(staged, flush=True)
        time.sleep(60)
"""


def test_crash_mid_download_leaves_no_entry_and_debris_is_cleaned(tmp_path: Path) -> None:
    proc = child(CRASH_CHILD, str(tmp_path), stdout=subprocess.PIPE)
    try:
        staged = Path(proc.stdout.readline().strip())
        assert staged.stat().st_size == 1000
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    cache = make_cache(tmp_path)
    key = cache.key_for("crashing-lora")
    assert cache.get(key) is None
    assert cache.entries() == []
    assert staged.exists()  # the debris the crash left

    # The dead process's lock went with it.
    took_lock = threading.Event()

    def take_lock() -> None:
        with cache.lock(key):
            took_lock.set()

    thread = threading.Thread(target=take_lock, daemon=True)
    thread.start()
    thread.join(timeout=5)
    assert took_lock.is_set()

    assert cache.clean_stale_staging(older_than_s=3600) == 0  # too fresh: could be a live download
    assert staged.exists()
    assert cache.clean_stale_staging(older_than_s=0) == 1
    assert not staged.exists()
    assert staging_files(tmp_path) == []


def test_clean_stale_staging_spares_recent_files(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    key = cache.key_for("k")
    with cache.staging(key) as old, cache.staging(key) as fresh:
        old.write_bytes(b"old")
        fresh.write_bytes(b"fresh")
        two_hours_ago = time.time() - 7200
        os.utime(old, (two_hours_ago, two_hours_ago))
        assert cache.clean_stale_staging() == 1
        assert not old.exists()
        assert fresh.exists()
    assert cache.clean_stale_staging() == 0


DOWNLOAD_CHILD = """
    import os, sys, time
    from pathlib import Path
    from flux_lora.lora.cache import LoraCache

    root, counter, go = (Path(arg) for arg in sys.argv[1:4])
    cache = LoraCache(root, 10**9)
    key = cache.key_for("shared-lora")
    Path(sys.argv[4]).touch()  # ready
    while not go.exists():
        time.sleep(0.005)
    with cache.lock(key):
        if cache.get(key) is None:
            with open(counter, "a") as f:
                f.write(f"{os.getpid()}\\n")
            with cache.staging(key) as staged:
                staged.write_bytes(b"w" * 500)
                time.sleep(0.3)  # a slow download: the other process must wait, not start its own
                cache.commit(key, staged, {"by": os.getpid()})
    print(cache.get(key).meta["by"], flush=True)
"""


def test_concurrent_fetches_under_lock_download_once(tmp_path: Path) -> None:
    root, counter, go = tmp_path / "cache", tmp_path / "writes.txt", tmp_path / "go"
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = [
        child(DOWNLOAD_CHILD, str(root), str(counter), str(go), str(flag), stdout=subprocess.PIPE)
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 8
        while not all(flag.exists() for flag in ready):
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        go.touch()
        outputs = [proc.communicate(timeout=10)[0].strip() for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0, 0]
    writers = counter.read_text().split()
    assert len(writers) == 1
    assert outputs == writers * 3  # every process got the one download
    assert make_cache(root).entries() == [make_cache(root).key_for("shared-lora")]


def test_lru_evicts_least_recently_committed(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=250)
    a, b, c = (cache.key_for(name) for name in ("a", "b", "c"))
    put(cache, "a")
    put(cache, "b")
    assert cache.entries() == [a, b]
    put(cache, "c")
    assert cache.entries() == [b, c]
    assert cache.get(a) is None
    assert cache.total_bytes() == 200


def test_get_refreshes_recency(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=250)
    a, b, c = (cache.key_for(name) for name in ("a", "b", "c"))
    put(cache, "a")
    put(cache, "b")
    assert cache.get(a) is not None
    assert cache.entries() == [b, a]
    put(cache, "c")
    assert cache.entries() == [a, c]
    assert cache.get(b) is None


def test_recency_survives_a_new_instance(tmp_path: Path) -> None:
    first = make_cache(tmp_path, max_bytes=250)
    a, b = first.key_for("a"), first.key_for("b")
    put(first, "a")
    put(first, "b")
    assert first.get(a) is not None  # a is now the most recent
    second = make_cache(tmp_path, max_bytes=250)
    assert second.entries() == [b, a]
    put(second, "c")
    assert second.get(b) is None
    assert second.get(a) is not None


def test_the_entry_just_committed_is_never_evicted(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=50)
    put(cache, "big", size=100)
    assert cache.entries() == [cache.key_for("big")]
    # Committed without holding its lock, so only the rule itself protects it.
    bigger = cache.key_for("bigger")
    with cache.staging(bigger) as staged:
        staged.write_bytes(b"B" * 120)
        cache.commit(bigger, staged, {})
    assert cache.entries() == [bigger]
    assert cache.total_bytes() == 120


def test_eviction_skips_an_entry_whose_lock_is_held(tmp_path: Path) -> None:
    cache = make_cache(tmp_path, max_bytes=250)
    a, b, c = (cache.key_for(name) for name in ("a", "b", "c"))
    put(cache, "a")
    put(cache, "b")
    with cache.lock(a):  # a reader is using a, the least recently used
        put(cache, "c")
        assert cache.entries() == [a, c]
        assert cache.get(b) is None
        assert cache.get(a).path.read_bytes() == b"a" * 100


def test_total_bytes_counts_only_entry_files(tmp_path: Path) -> None:
    cache = make_cache(tmp_path)
    assert cache.total_bytes() == 0
    put(cache, "a", size=100, meta={"long": "m" * 1000})
    put(cache, "b", size=37)
    with cache.staging(cache.key_for("c")) as staged:
        staged.write_bytes(b"c" * 5000)
        assert cache.total_bytes() == 137


@pytest.mark.parametrize("failing", ["replace", "rename"])
def test_disk_full_leaves_no_entry_and_no_staging(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    cache = make_cache(tmp_path)
    key = cache.key_for("too-big")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with cache.lock(key), cache.staging(key) as staged:
        staged.write_bytes(b"z" * 100)
        monkeypatch.setattr(os, failing, no_space)
        with pytest.raises(CacheError, match="disk full") as caught:
            cache.commit(key, staged, {"name": "too-big"})
        monkeypatch.undo()
        assert not staged.exists()
    assert isinstance(caught.value, OSError)
    assert caught.value.__cause__.errno == errno.ENOSPC
    assert key in str(caught.value)
    assert cache.get(key) is None
    assert cache.entries() == []
    assert staging_files(tmp_path) == []
    assert list((tmp_path / "entries").iterdir()) == []


def test_from_env_reads_both_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLUX_LORA_CACHE_DIR", str(tmp_path / "from-env"))
    monkeypatch.setenv("FLUX_LORA_CACHE_MAX_GB", "0.5")
    cache = LoraCache.from_env(tmp_path / "default")
    assert cache.root == tmp_path / "from-env"
    assert cache.max_bytes == 500_000_000
    assert not cache.root.exists()  # nothing touches the disk until it is used


def test_from_env_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLUX_LORA_CACHE_DIR", raising=False)
    monkeypatch.delenv("FLUX_LORA_CACHE_MAX_GB", raising=False)
    cache = LoraCache.from_env(tmp_path / "default")
    assert cache.root == tmp_path / "default"
    assert cache.max_bytes == int(DEFAULT_MAX_GB * 10**9) == 20_000_000_000


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf", "20GB"])
def test_from_env_rejects_a_bad_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FLUX_LORA_CACHE_MAX_GB", value)
    with pytest.raises(ConfigError) as caught:
        LoraCache.from_env(tmp_path)
    message = str(caught.value)
    assert f"FLUX_LORA_CACHE_MAX_GB='{value}'" in message
    assert "number of gigabytes >= 0" in message
    assert "unset it" in message
