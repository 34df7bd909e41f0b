"""What a LoRA fetch may cost: compressed and crowded tarballs refused, a wall-clock limit on each
download, a cancel that wakes a blocked read, and a cache that respects credentials."""

from __future__ import annotations

import base64
import bz2
import gzip
import hashlib
import io
import lzma
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from flux_lora.errors import CanceledError, DeadlineError, DownloadError, InputError
from flux_lora.interrupt import CheckedReader, Interrupt
from flux_lora.lora.cache import LoraCache
from flux_lora.lora.fetch import LoraFetcher
from flux_lora.lora.files import MAX_MEMBERS, extract_safetensors
from tests.fakes import (
    Exchange,
    FakeServer,
    HubRepo,
    add_hub,
    make_replicate_tar,
    make_safetensors,
    make_tar,
    regular,
)
from tests.lora.test_fetch import INPUT, LORA, leftovers, ref

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "bzip2": bz2.compress,
    "xz": lzma.compress,
}


def bzip2_bomb(claimed: int = 1990 * 1024**2, zeros: int = 16 * 1024**2) -> bytes:
    """A bzip2 tar stream that opens with a `claimed`-byte member of zeros (only `zeros` of them
    written: what is refused must be refused before a byte of it matters)."""
    info = tarfile.TarInfo("filler.bin")
    info.size = claimed
    compressor = bz2.BZ2Compressor(9)
    parts = [compressor.compress(info.tobuf(format=tarfile.GNU_FORMAT))]
    chunk = bytes(1 << 20)
    parts += [compressor.compress(chunk) for _ in range(zeros >> 20)]
    return b"".join([*parts, compressor.flush()])


def fetcher_for(cache: LoraCache, **kwargs) -> LoraFetcher:
    return LoraFetcher(cache, max_download_bytes=1024**2, allow_private=True, **kwargs)


def assert_nothing_kept(cache: LoraCache) -> None:
    assert cache.entries() == []
    assert leftovers(cache) == []


# Tarballs.


@pytest.mark.parametrize("kind", COMPRESSORS)
def test_a_compressed_tarball_is_refused_whatever_its_source(kind, fake, cache):
    packed = COMPRESSORS[kind](make_replicate_tar(LORA))
    fake.file("/lora.tar", packed)
    fetcher = fetcher_for(cache, timeout_s=1.0)
    for source in (
        f"{fake.url}/lora.tar",
        "data:application/x-tar;base64," + base64.b64encode(packed).decode(),
    ):
        with pytest.raises(InputError, match=f"is {kind}-compressed; only plain .tar files are read"):
            fetcher.fetch(ref(source, fake), INPUT)
    assert_nothing_kept(cache)


def test_a_bzip2_bomb_is_refused_before_it_costs_anything(fake, cache):
    bomb = bzip2_bomb()
    assert len(bomb) < 64 * 1024  # claims 1.99 GB
    fake.file("/bomb.tar", bomb)
    started = time.monotonic()
    with pytest.raises(InputError, match="bzip2-compressed"):
        fetcher_for(cache, timeout_s=1.0).fetch(ref(f"{fake.url}/bomb.tar", fake), INPUT)
    assert time.monotonic() - started < 1.0
    assert_nothing_kept(cache)


def test_a_tarball_of_many_members_is_refused(tmp_path: Path):
    members = [regular(f"junk/{n}.txt", b"x") for n in range(MAX_MEMBERS + 1)]
    data = make_tar([*members, regular("lora.safetensors", LORA)])
    with pytest.raises(InputError, match=f"more than {MAX_MEMBERS} members"):
        extract_safetensors(io.BytesIO(data), tmp_path / "out", "extra_lora: x", 1024**2)


def test_a_plain_tarball_still_gives_its_member(tmp_path: Path):
    staged = tmp_path / "out"
    assert extract_safetensors(io.BytesIO(make_replicate_tar(LORA)), staged, "x", 1024**2) == "TOK"
    assert staged.read_bytes() == LORA


def test_unpacking_checks_for_a_stop_between_reads(tmp_path: Path):
    interrupt = Interrupt()
    source = CheckedReader(io.BytesIO(make_replicate_tar(LORA)), interrupt)
    interrupt.cancel()
    with pytest.raises(CanceledError):
        extract_safetensors(source, tmp_path / "out", "x", 1024**2)


# Time.


def test_a_server_that_drips_hits_the_download_limit(fake, cache):
    """One byte every 0.3 s never trips the 1 s read timeout; the 2 s limit on the whole
    download ends it."""
    fake.drip("/drip.safetensors", LORA, every_s=0.3)
    started = time.monotonic()
    with pytest.raises(DeadlineError, match=r"took longer than its limit of 2 s.*FLUX_LORA_DOWNLOAD_LIMIT_S"):
        fetcher_for(cache, timeout_s=1.0, limit_s=2.0).fetch(ref(f"{fake.url}/drip.safetensors", fake), INPUT)
    assert 1.9 < time.monotonic() - started < 3.5
    assert_nothing_kept(cache)


@pytest.mark.parametrize("path", ["/stall.safetensors", "/stall.tar"])
def test_a_cancel_wakes_a_download_blocked_on_a_silent_server(path, fake, cache):
    """The read would wait 30 s for data; a cancel from another thread ends it at once, whether
    the body is copied or unpacked as a tarball."""
    fake.stall(path, make_replicate_tar(LORA) if path.endswith(".tar") else LORA, seconds=30)
    interrupt = Interrupt()
    fetcher = fetcher_for(cache, timeout_s=30.0)
    canceler = threading.Timer(0.5, interrupt.cancel)
    canceler.start()
    started = time.monotonic()
    with pytest.raises(CanceledError):
        fetcher.fetch(ref(f"{fake.url}{path}", fake), INPUT, interrupt)
    assert time.monotonic() - started < 1.5
    assert_nothing_kept(cache)


def test_a_cancel_wakes_a_hugging_face_download_blocked_on_its_cdn(fake, cache):
    """Hugging Face files come through the same downloader: its CDN going silent is no different."""
    with FakeServer("127.0.0.2") as cdn:
        add_hub(fake, [HubRepo("bob/style", {"lora.safetensors": LORA}, lfs_cdn=cdn)])
        cdn.stall(f"/cdn-lfs/{hashlib.sha256(LORA).hexdigest()}", LORA, seconds=30)
        interrupt = Interrupt()
        threading.Timer(1.0, interrupt.cancel).start()
        started = time.monotonic()
        with pytest.raises(CanceledError):
            fetcher_for(cache, timeout_s=30.0).fetch(ref("huggingface.co/bob/style", fake), INPUT, interrupt)
        assert time.monotonic() - started < 2.0
        assert cdn.sent  # it was mid-download
    assert_nothing_kept(cache)


def test_a_passed_phase_limit_names_the_phase_and_its_variable():
    interrupt = Interrupt({"fetch": 0.05})
    with interrupt.phase("fetch"):
        time.sleep(0.1)
        with pytest.raises(DeadlineError, match=r"downloading .* limit of 0.05 s.*FLUX_LORA_FETCH_LIMIT_S"):
            interrupt.check()
    with pytest.raises(DeadlineError):  # a stop is final for the prediction
        interrupt.check()


def test_a_phase_entered_again_keeps_counting_from_its_first_start():
    interrupt = Interrupt({"fetch": 0.2})
    with interrupt.phase("fetch"):
        time.sleep(0.15)
    with interrupt.phase("fetch"):
        interrupt.check()  # 0.15 s used of 0.2
        time.sleep(0.1)
        with pytest.raises(DeadlineError):
            interrupt.check()


# Credentials.


def test_a_file_fetched_with_a_credential_reaches_only_callers_who_present_it(fake, cache):
    def signed(ex: Exchange) -> None:
        if ex.seen.query.get("token") == "GOOD":
            ex.send(200, LORA, {"Content-Type": "application/octet-stream"})
        else:
            ex.send(403, b"forbidden", {"Content-Type": "text/plain"})

    fake.route("/private.safetensors", signed)
    fetcher = fetcher_for(cache, timeout_s=1.0)
    url = f"{fake.url}/private.safetensors"
    assert fetcher.fetch(ref(f"{url}?token=GOOD", fake), INPUT).path.read_bytes() == LORA
    for refused in (f"{url}?token=WRONG", url, f"{url}?token=GOOD2"):
        with pytest.raises(DownloadError, match=r"refused \(403\)"):
            fetcher.fetch(ref(refused, fake), INPUT)
    assert fake.count("/private.safetensors") == 4  # every other caller asked the origin
    again = fetcher.fetch(ref(f"{url}?token=GOOD", fake), INPUT)
    assert again.from_cache and fake.count("/private.safetensors") == 4


def test_a_file_fetched_without_credentials_is_shared_as_before(fake, cache):
    fake.file("/public.safetensors", make_safetensors())
    fetcher = fetcher_for(cache, timeout_s=1.0)
    first = fetcher.fetch(ref(f"{fake.url}/public.safetensors", fake), INPUT)
    second = fetcher.fetch(ref(f"{fake.url}/public.safetensors?v=", fake), INPUT)
    assert not first.from_cache and fake.count("/public.safetensors") >= 1
    assert second.path.read_bytes() == first.path.read_bytes()
