"""LoraFetcher against loopback fakes of Replicate, the Hugging Face Hub, CivitAI and plain web servers."""

from __future__ import annotations

import base64
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hf_constants

from flux_lora.errors import DownloadError, InputError
from flux_lora.lora.cache import LoraCache
from flux_lora.lora.fetch import FetchedLora, LoraFetcher
from flux_lora.lora.refs import Endpoints, LoraRef, parse_lora_ref
from flux_lora.models.layout import REPO_ROOT
from tests.fakes import (
    CivitaiVersion,
    FakeServer,
    HubRepo,
    add_civitai,
    add_hub,
    add_replicate,
    hostile_tar,
    make_replicate_tar,
    make_safetensors,
    unresolvable,
)

INPUT = "replicate_weights"
LORA = make_safetensors()
OTHER_LORA = make_safetensors({"transformer.b.lora_A.weight": torch.zeros(2, 3)})
THIRD_LORA = make_safetensors({"transformer.c.lora_B.weight": torch.full((3, 3), 2.0, dtype=torch.float16)})
SECRETS = ("r8_SECRETREPLICATE", "hf_SECRETHF", "SECRETCIVITAI", "SECRET123", "hunter2pass")
ROOT = REPO_ROOT


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("REPLICATE_API_TOKEN", "HF_TOKEN", "CIVITAI_API_TOKEN", "FLUX_LORA_ALLOW_PRIVATE_URLS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def other() -> FakeServer:
    """A second loopback host: a different origin for cross-host redirects."""
    with FakeServer("127.0.0.2") as server:
        yield server


@pytest.fixture
def fetcher(cache: LoraCache) -> LoraFetcher:
    return LoraFetcher(cache, max_download_bytes=1024**2, timeout_s=1.0, allow_private=True)


def ref(text: str, fake: FakeServer, *, allow_local: bool = False) -> LoraRef:
    endpoints = Endpoints(replicate=fake.url, huggingface=fake.url, civitai=fake.url)
    return parse_lora_ref(text, INPUT, endpoints, allow_local=allow_local)


def leftovers(cache: LoraCache) -> list[str]:
    """Files in the cache that are not committed entries or lock files."""
    staging = cache.root / ".staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def assert_not_cached(cache: LoraCache, lora_ref: LoraRef) -> None:
    assert cache.get(cache.key_for(lora_ref.identity)) is None
    assert cache.entries() == []
    assert leftovers(cache) == []


def error_text(err: BaseException) -> str:
    """Everything an exception could show: str, repr, and the formatted chain with causes."""
    parts, seen = [], set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        parts += [str(current), repr(current)]
        current = current.__cause__ or current.__context__
    parts.append("".join(traceback.format_exception(err)))
    return "\n".join(parts)


# Sources.


@pytest.mark.parametrize("name", ["owner/model", "owner/model/abc123", "https://replicate.com/owner/model"])
def test_replicate_redirect_to_tarball(name, fake, other, fetcher, cache, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_SECRETREPLICATE")
    add_replicate(fake, other, "owner/model", make_replicate_tar(LORA, "TOK"), token="r8_SECRETREPLICATE")
    lora_ref = ref(name, fake)

    got = fetcher.fetch(lora_ref, INPUT)

    assert got.path.read_bytes() == LORA
    assert got.trigger_word == "TOK"
    assert got.from_cache is False
    assert got.path.is_relative_to(cache.root)
    [weights] = fake.requests(r"/owner/model(/versions/abc123)?/_weights")
    assert weights.path.endswith("/versions/abc123/_weights") == ("abc123" in name)
    assert weights.headers["authorization"] == "Bearer r8_SECRETREPLICATE"
    [blob] = other.requests()
    assert "authorization" not in blob.headers  # not forwarded to the storage host
    assert leftovers(cache) == []


def test_replicate_without_token_is_refused(fake, other, fetcher, cache):
    add_replicate(fake, other, "owner/model", make_replicate_tar(LORA), token="r8_needed")
    with pytest.raises(DownloadError, match=r"replicate_weights: .*owner/model.*refused \(401\)"):
        fetcher.fetch(ref("owner/model", fake), INPUT)
    assert other.count() == 0


def test_plain_safetensors_url(fake, fetcher):
    fake.file("/loras/style.safetensors", LORA)
    got = fetcher.fetch(ref(f"{fake.url}/loras/style.safetensors", fake), INPUT)
    assert got.path.read_bytes() == LORA
    assert (got.trigger_word, got.from_cache) == (None, False)
    assert got.display == f"{fake.url}/loras/style.safetensors"


def test_tar_url_with_trigger_word(fake, fetcher):
    fake.file("/trainings/out.tar", make_replicate_tar(OTHER_LORA, "ZQX"))
    got = fetcher.fetch(ref(f"{fake.url}/trainings/out.tar", fake), INPUT)
    assert got.path.read_bytes() == OTHER_LORA
    assert got.trigger_word == "ZQX"


def test_tar_without_config_has_no_trigger_word(fake, fetcher):
    fake.file("/t.tar", make_replicate_tar(LORA, trigger_word=None))
    assert fetcher.fetch(ref(f"{fake.url}/t.tar", fake), INPUT).trigger_word is None


@pytest.mark.parametrize("payload", ["safetensors", "tar"])
def test_data_url(payload, fake, fetcher):
    data = LORA if payload == "safetensors" else make_replicate_tar(LORA, "DATA")
    text = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    got = fetcher.fetch(ref(text, fake), INPUT)
    assert got.path.read_bytes() == LORA
    assert got.trigger_word == (None if payload == "safetensors" else "DATA")
    assert fake.count() == 0


def test_data_url_too_large(fake, cache):
    fetcher = LoraFetcher(cache, max_download_bytes=100, allow_private=True)
    text = "data:application/octet-stream;base64," + base64.b64encode(LORA).decode()
    with pytest.raises(InputError, match="larger than"):
        fetcher.fetch(ref(text, fake), INPUT)


def test_local_files(tmp_path, fake, fetcher, cache):
    lora = tmp_path / "lora.safetensors"
    lora.write_bytes(LORA)
    got = fetcher.fetch(ref(str(lora), fake, allow_local=True), "COG_WEIGHTS")
    assert got == FetchedLora(lora, True, None, str(lora))
    assert cache.entries() == []  # used in place

    tar = tmp_path / "trained.tar"
    tar.write_bytes(make_replicate_tar(OTHER_LORA, "LOCAL"))
    got = fetcher.fetch(ref(str(tar), fake, allow_local=True), "COG_WEIGHTS")
    assert got.path.read_bytes() == OTHER_LORA and got.trigger_word == "LOCAL"
    assert got.path.is_relative_to(cache.root)

    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DownloadError, match=f"COG_WEIGHTS: .*{missing}"):
        fetcher.fetch(ref(str(missing), fake, allow_local=True), "COG_WEIGHTS")


# Hugging Face.


def test_huggingface_repo_with_one_file(fake, fetcher, cache):
    add_hub(fake, [HubRepo("alice/style", {"lora.safetensors": LORA, "config.json": b"{}"})])
    got = fetcher.fetch(ref("huggingface.co/alice/style", fake), INPUT)
    assert got.path.read_bytes() == LORA
    assert fake.count("/api/models/alice/style/revision/main") == 1
    assert [s.method for s in fake.requests(r"/alice/style/resolve/.*")][-1] == "GET"
    assert leftovers(cache) == []  # hf_hub_download's local_dir is gone
    assert not (Path(hf_constants.HF_HUB_CACHE) / "models--alice--style").exists()  # no second copy


def test_huggingface_repo_with_several_files(fake, fetcher, cache):
    add_hub(fake, [HubRepo("alice/multi", {"a.safetensors": LORA, "b.safetensors": OTHER_LORA})])
    lora_ref = ref("https://huggingface.co/alice/multi", fake)
    with pytest.raises(InputError) as caught:
        fetcher.fetch(lora_ref, INPUT)
    message = str(caught.value)
    assert message.startswith(f"{INPUT}: ")
    assert "a.safetensors" in message and "b.safetensors" in message
    assert "huggingface.co/alice/multi/resolve/main/a.safetensors" in message
    assert fake.count(r"/alice/multi/resolve/.*") == 0
    assert_not_cached(cache, lora_ref)


def test_huggingface_repo_without_safetensors(fake, fetcher):
    add_hub(fake, [HubRepo("alice/empty", {"model.bin": b"pickle"})])
    with pytest.raises(InputError, match=r"no \.safetensors file"):
        fetcher.fetch(ref("huggingface.co/alice/empty", fake), INPUT)


@pytest.mark.parametrize("link", ["resolve/v2/b.safetensors", "blob/v2/b.safetensors"])
def test_huggingface_file_link_with_revision(link, fake, fetcher):
    add_hub(
        fake,
        [HubRepo("alice/multi", {"a.safetensors": LORA, "b.safetensors": OTHER_LORA}, revisions=("v2",))],
    )
    got = fetcher.fetch(ref(f"huggingface.co/alice/multi/{link}", fake), INPUT)
    assert got.path.read_bytes() == OTHER_LORA
    assert fake.count("/alice/multi/resolve/v2/b.safetensors") >= 1
    assert fake.count("/api/models/.*") == 0  # a named file needs no listing


def test_huggingface_tree_link_with_unknown_revision(fake, fetcher):
    add_hub(fake, [HubRepo("alice/style", {"lora.safetensors": LORA})])
    with pytest.raises(DownloadError, match="no revision 'nope'"):
        fetcher.fetch(ref("huggingface.co/alice/style/tree/nope", fake), INPUT)


def test_huggingface_missing_repo_and_file(fake, fetcher):
    add_hub(fake, [HubRepo("alice/style", {"lora.safetensors": LORA})])
    with pytest.raises(DownloadError, match=r"alice/ghost was not found \(404\)"):
        fetcher.fetch(ref("huggingface.co/alice/ghost", fake), INPUT)
    with pytest.raises(DownloadError, match=r"has no file 'other.safetensors'.*\(404\)"):
        fetcher.fetch(ref("huggingface.co/alice/style/resolve/main/other.safetensors", fake), INPUT)


def test_huggingface_gated_repo(fake, other, fetcher, cache, monkeypatch):
    add_hub(fake, [HubRepo("corp/gated", {"lora.safetensors": LORA}, token="hf_SECRETHF", lfs_cdn=other)])
    lora_ref = ref("huggingface.co/corp/gated", fake)

    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(lora_ref, INPUT)
    assert "gated or private (401)" in str(caught.value) and "set HF_TOKEN" in str(caught.value)
    assert other.count() == 0

    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(DownloadError, match=r"\(403\).*HF_TOKEN was refused"):
        fetcher.fetch(lora_ref, INPUT)
    assert_not_cached(cache, lora_ref)

    monkeypatch.setenv("HF_TOKEN", "hf_SECRETHF")
    got = fetcher.fetch(lora_ref, INPUT)
    assert got.path.read_bytes() == LORA
    resolves = fake.requests(r"/corp/gated/resolve/.*")
    assert resolves[-1].headers["authorization"] == "Bearer hf_SECRETHF"
    [cdn] = other.requests()
    assert cdn.method == "GET" and "authorization" not in cdn.headers  # the CDN never sees the token


def test_huggingface_file_over_the_limit_is_refused_before_download(fake, cache):
    big = make_safetensors({"w": torch.zeros(1024, 1024)})  # 4 MiB
    add_hub(fake, [HubRepo("alice/big", {"lora.safetensors": big})])
    fetcher = LoraFetcher(cache, max_download_bytes=1024**2, timeout_s=1.0, allow_private=True)
    with pytest.raises(InputError, match="larger than the 1 MiB limit"):
        fetcher.fetch(ref("huggingface.co/alice/big", fake), INPUT)
    assert [s.method for s in fake.requests(r"/alice/big/resolve/.*")] == ["HEAD"]


# CivitAI.


@pytest.fixture
def civitai(fake: FakeServer, other: FakeServer) -> FakeServer:
    add_civitai(
        fake,
        other,
        {
            123: [CivitaiVersion(502, OTHER_LORA), CivitaiVersion(501, LORA)],
            77: [CivitaiVersion(700, THIRD_LORA, token="SECRETCIVITAI")],
        },
    )
    return fake


def test_civitai_model_takes_newest_version(civitai, other, fetcher):
    got = fetcher.fetch(ref("https://civitai.com/models/123/some-style", civitai), INPUT)
    assert got.path.read_bytes() == OTHER_LORA
    [download] = civitai.requests(r"/api/download/models/\d+")
    assert download.path == "/api/download/models/502"
    assert download.query == {"type": "Model", "format": "SafeTensor"}
    assert other.count("/civitai-storage/502/lora.safetensors") == 1


def test_civitai_model_version_id(civitai, fetcher):
    got = fetcher.fetch(ref("civitai.com/models/123?modelVersionId=501", civitai), INPUT)
    assert got.path.read_bytes() == LORA
    assert civitai.count("/api/v1/models/.*") == 0
    assert [s.path for s in civitai.requests("/api/download/.*")] == ["/api/download/models/501"]


def test_civitai_download_link_with_token_query(civitai, other, fetcher, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    lora_ref = ref("https://civitai.com/api/download/models/700?type=Model&token=SECRETCIVITAI", civitai)
    got = fetcher.fetch(lora_ref, INPUT)
    assert got.path.read_bytes() == THIRD_LORA
    assert "SECRETCIVITAI" not in got.display and "token=***" in got.display
    assert civitai.requests("/api/download/models/700")[0].query["token"] == "SECRETCIVITAI"
    assert "SECRETCIVITAI" not in caplog.text and "token=***" in caplog.text

    # The cache is keyed by version, not by token: a fresh cache shows what a wrong token gets.
    fresh = LoraFetcher(LoraCache(tmp_path / "fresh", 10**9), timeout_s=1.0, allow_private=True)
    wrong = ref("https://civitai.com/api/download/models/700?token=SECRET123", civitai)
    with pytest.raises(DownloadError) as caught:
        fresh.fetch(wrong, INPUT)
    assert "refused the token" in str(caught.value)
    assert "SECRET123" not in error_text(caught.value)


def test_civitai_token_required(civitai, other, fetcher, monkeypatch):
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(ref("civitai.com/models/77", civitai), INPUT)
    assert "CIVITAI_API_TOKEN" in str(caught.value) and "requires an API token" in str(caught.value)
    assert str(caught.value).startswith(f"{INPUT}: ")

    monkeypatch.setenv("CIVITAI_API_TOKEN", "SECRETCIVITAI")
    got = fetcher.fetch(ref("civitai.com/models/77", civitai), INPUT)
    assert got.path.read_bytes() == THIRD_LORA
    assert civitai.requests("/api/download/models/700")[-1].headers["authorization"] == "Bearer SECRETCIVITAI"
    assert all("authorization" not in s.headers for s in other.requests())


def test_civitai_not_found(civitai, fetcher):
    with pytest.raises(DownloadError, match=r"CivitAI has no model 999 \(404\): check the link"):
        fetcher.fetch(ref("civitai.com/models/999", civitai), INPUT)
    with pytest.raises(DownloadError, match=r"CivitAI has no model version 777 \(404\): check the link"):
        fetcher.fetch(ref("civitai.com/models/123?modelVersionId=777", civitai), INPUT)


# Cache.


def test_second_fetch_is_served_from_cache_without_network(fake, other, fetcher, caplog, monkeypatch):
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_x")
    add_replicate(fake, other, "owner/model", make_replicate_tar(LORA, "TOK"))
    lora_ref = ref("owner/model", fake)
    first = fetcher.fetch(lora_ref, INPUT)
    before = (fake.count(), other.count())

    caplog.set_level(logging.INFO, logger="flux_lora.lora.fetch")
    second = fetcher.fetch(lora_ref, INPUT)

    assert (fake.count(), other.count()) == before == (1, 1)
    assert second.from_cache is True and first.from_cache is False
    assert second.path == first.path and second.trigger_word == "TOK"
    assert "cached" in caplog.text


def test_concurrent_threads_download_once(fake, fetcher):
    fake.file("/slow.safetensors", LORA, delay=0.3)
    lora_ref = ref(f"{fake.url}/slow.safetensors", fake)
    results: list[FetchedLora] = []
    threads = [
        threading.Thread(target=lambda: results.append(fetcher.fetch(lora_ref, INPUT))) for _ in range(6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert len(results) == 6
    assert fake.count("/slow.safetensors") == 1
    assert sorted(r.from_cache for r in results) == [False] + [True] * 5
    assert {r.path for r in results} == {results[0].path}


CHILD = """
import json, sys
from pathlib import Path
from flux_lora.lora.cache import LoraCache
from flux_lora.lora.refs import parse_lora_ref
from flux_lora.lora.fetch import LoraFetcher
fetcher = LoraFetcher(LoraCache(Path(sys.argv[1]), 10**9), timeout_s=5, allow_private=True)
got = fetcher.fetch(parse_lora_ref(sys.argv[2], "replicate_weights"), "replicate_weights")
print(json.dumps({"path": str(got.path), "from_cache": got.from_cache}))
"""


def test_concurrent_processes_download_once(fake, cache):
    fake.file("/shared.safetensors", LORA, delay=0.5)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(cache.root), f"{fake.url}/shared.safetensors"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [json.loads(child.communicate(timeout=30)[0]) for child in children]
    assert [child.returncode for child in children] == [0, 0]
    assert fake.count("/shared.safetensors") == 1
    assert sorted(o["from_cache"] for o in outputs) == [False, True]
    assert outputs[0]["path"] == outputs[1]["path"]
    assert Path(outputs[0]["path"]).read_bytes() == LORA


# HTTP failures.


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (404, r"not found \(404\): check the URL"),
        (401, r"refused \(401\): the URL needs credentials"),
        (403, r"refused \(403\): the URL needs credentials"),
        (500, r"the server failed \(500\); try again later"),
    ],
)
def test_http_status_messages(status, expected, fake, fetcher, cache):
    fake.status("/x.safetensors", status)
    lora_ref = ref(f"{fake.url}/x.safetensors?token=SECRET123", fake)
    with pytest.raises(DownloadError, match=expected) as caught:
        fetcher.fetch(lora_ref, INPUT)
    assert str(caught.value).startswith(f"{INPUT}: {fake.url}/x.safetensors?token=***: ")
    assert "SECRET123" not in error_text(caught.value)
    assert_not_cached(cache, lora_ref)


def test_truncated_body_is_an_error_and_not_cached(fake, fetcher, cache):
    fake.truncated("/cut.safetensors", LORA[:100], claimed=len(LORA))
    lora_ref = ref(f"{fake.url}/cut.safetensors", fake)
    with pytest.raises(DownloadError, match=f"cut off after 100 of {len(LORA)} bytes"):
        fetcher.fetch(lora_ref, INPUT)
    assert_not_cached(cache, lora_ref)


def test_html_served_as_safetensors(fake, fetcher, cache):
    page = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
    fake.file("/page.safetensors", page, headers={"Content-Type": "text/html"})
    lora_ref = ref(f"{fake.url}/page.safetensors", fake)
    with pytest.raises(InputError, match=r"not a safetensors file \(it looks like an HTML page"):
        fetcher.fetch(lora_ref, INPUT)
    assert_not_cached(cache, lora_ref)


def test_announced_oversize_refused_before_reading(fake, fetcher, cache):
    # The body never comes: only a refusal on Content-Length alone can answer before the 1 s timeout.
    fake.stall("/huge.safetensors", b"", length=10 * 1024**3)
    lora_ref = ref(f"{fake.url}/huge.safetensors", fake)
    started = time.monotonic()
    with pytest.raises(InputError, match="larger than the 1 MiB limit"):
        fetcher.fetch(lora_ref, INPUT)
    assert time.monotonic() - started < 0.8
    assert_not_cached(cache, lora_ref)


@pytest.mark.parametrize("announced", [False, True])
def test_oversize_body_stops_early(announced, fake, fetcher, cache):
    """A body with no Content-Length, or one that lies (announces 512 KiB, sends more: the extra is
    never read), is cut at the limit or at its announced end."""
    total = 256 * 1024**2
    fake.endless("/huge.safetensors", total, announce=512 * 1024 if announced else None)
    lora_ref = ref(f"{fake.url}/huge.safetensors", fake)
    started = time.monotonic()
    expected = (
        (InputError, "not a safetensors file") if announced else (InputError, "larger than the 1 MiB limit")
    )
    with pytest.raises(expected[0], match=expected[1]):
        fetcher.fetch(lora_ref, INPUT)
    assert time.monotonic() - started < 5
    assert fake.sent["/huge.safetensors"] < total / 4  # the client hung up long before the end
    assert_not_cached(cache, lora_ref)


def test_stalled_server_times_out(fake, fetcher, cache):
    fake.stall("/stall.safetensors", LORA)
    lora_ref = ref(f"{fake.url}/stall.safetensors", fake)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="timed out"):
        fetcher.fetch(lora_ref, INPUT)
    assert 0.9 < time.monotonic() - started < 4
    assert_not_cached(cache, lora_ref)


def test_too_many_redirects_and_bad_schemes(fake, fetcher):
    fake.redirect("/loop.safetensors", "/loop.safetensors")
    with pytest.raises(DownloadError, match="more than 5 redirects"):
        fetcher.fetch(ref(f"{fake.url}/loop.safetensors", fake), INPUT)
    assert fake.count("/loop.safetensors") == 6
    fake.redirect("/file.safetensors", "file:///etc/passwd")
    with pytest.raises(InputError, match="only http and https"):
        fetcher.fetch(ref(f"{fake.url}/file.safetensors", fake), INPUT)


# Address policy.


def test_private_address_refused_without_the_flag(fake, cache, monkeypatch):
    fake.file("/lora.safetensors", LORA)
    lora_ref = ref(f"{fake.url}/lora.safetensors", fake)
    with pytest.raises(InputError, match=r"refusing to download from 127\.0\.0\.1.*\(127\.0\.0\.1\)"):
        LoraFetcher(cache, timeout_s=1.0).fetch(lora_ref, INPUT)
    assert fake.count() == 0  # refused before connecting

    monkeypatch.setenv("FLUX_LORA_ALLOW_PRIVATE_URLS", "1")
    assert LoraFetcher(cache, timeout_s=1.0).fetch(lora_ref, INPUT).path.read_bytes() == LORA


def test_redirect_to_private_address_refused_per_hop(fake, other, cache):
    def only_127_0_0_1(ip) -> bool:  # 127.0.0.1 plays a public host; 127.0.0.2 stays private
        return str(ip) == "127.0.0.1"

    fetcher = LoraFetcher(cache, timeout_s=1.0, allow_private=False, is_public_address=only_127_0_0_1)
    fake.file("/direct.safetensors", LORA)
    assert fetcher.fetch(ref(f"{fake.url}/direct.safetensors", fake), INPUT).path.read_bytes() == LORA

    other.file("/internal.safetensors", OTHER_LORA)
    fake.redirect("/bounce.safetensors", f"{other.url}/internal.safetensors")
    lora_ref = ref(f"{fake.url}/bounce.safetensors", fake)
    with pytest.raises(InputError, match=r"refusing to download from 127\.0\.0\.2"):
        fetcher.fetch(lora_ref, INPUT)
    assert fake.count("/bounce.safetensors") == 1
    assert other.count() == 0
    assert_not_cached_key(cache, lora_ref)


def assert_not_cached_key(cache: LoraCache, lora_ref: LoraRef) -> None:
    assert cache.get(cache.key_for(lora_ref.identity)) is None


# Verification.


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo", "two", "none"])
def test_hostile_tarballs_refused(kind, fake, fetcher, cache):
    data, member = hostile_tar(kind, LORA)
    fake.file("/bad.tar", data)
    lora_ref = ref(f"{fake.url}/bad.tar", fake)
    with pytest.raises(InputError) as caught:
        fetcher.fetch(lora_ref, INPUT)
    assert member in str(caught.value)
    assert str(caught.value).startswith(f"{INPUT}: {fake.url}/bad.tar: ")
    assert_not_cached(cache, lora_ref)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ((5 * 1024**3).to_bytes(8, "little") + b'{"w":{}}', "header claims 5368709120 bytes"),
        (len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]", "not a JSON object"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00{}  ", "no tensors"),
        (
            b"\x40\x00\x00\x00\x00\x00\x00\x00"
            + b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.ljust(64)
            + b"\x00" * 4,
            "tensors cover 8 bytes but the file holds 4",
        ),
        (
            b"\x40\x00\x00\x00\x00\x00\x00\x00"
            + b'{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}'.ljust(64)
            + b"\x00" * 8,
            "has 8 bytes for its shape",
        ),
    ],
)
def test_malformed_safetensors_refused(payload, reason, fake, fetcher, cache):
    fake.file("/odd.safetensors", payload)
    lora_ref = ref(f"{fake.url}/odd.safetensors", fake)
    with pytest.raises(InputError, match="not a safetensors file") as caught:
        fetcher.fetch(lora_ref, INPUT)
    assert reason in str(caught.value)
    assert_not_cached(cache, lora_ref)


# Secrets.


def test_a_hub_whose_name_does_not_resolve_says_so_without_try_again(fetcher, cache, monkeypatch):
    """HF_ENDPOINT's host has no DNS answer (no network): the message says so, not "try again"."""
    unresolvable(monkeypatch, "hub.example")
    endpoints = Endpoints(replicate="http://hub.example", huggingface="http://hub.example", civitai="")
    lora_ref = parse_lora_ref("huggingface.co/alice/style", INPUT, endpoints)
    with pytest.raises(DownloadError) as caught:
        fetcher.fetch(lora_ref, INPUT)
    message = str(caught.value)
    assert "the host name hub.example cannot be resolved (Name or service not known)" in message, message
    assert "again" not in message
    assert leftovers(cache) == []


def test_secrets_never_reach_messages_logs_or_cache(fake, other, fetcher, cache, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("REPLICATE_API_TOKEN", "r8_SECRETREPLICATE")
    monkeypatch.setenv("HF_TOKEN", "hf_SECRETHF")
    monkeypatch.setenv("CIVITAI_API_TOKEN", "SECRETCIVITAI")
    add_replicate(fake, other, "owner/model", make_replicate_tar(LORA), token="r8_SECRETREPLICATE")
    add_replicate(fake, other, "owner/locked", make_replicate_tar(LORA), token="r8_other")
    add_hub(fake, [HubRepo("corp/gated", {"lora.safetensors": LORA}, token="hf_other", lfs_cdn=other)])
    add_hub(fake, [HubRepo("alice/style", {"lora.safetensors": OTHER_LORA}, lfs_cdn=other)])
    add_civitai(
        fake,
        other,
        {5: [CivitaiVersion(50, LORA, token="SECRETCIVITAI")], 6: [CivitaiVersion(60, LORA, "x")]},
    )
    fake.file("/ok.safetensors", LORA)
    fake.status("/gone.safetensors", 404)
    fake.truncated("/cut.safetensors", LORA[:50], claimed=len(LORA))
    fake.file("/page.safetensors", b"<html>not weights</html>")
    host = fake.url.removeprefix("http://")
    texts = [
        "owner/model",
        "owner/locked",
        "huggingface.co/corp/gated",
        "huggingface.co/alice/style",
        "civitai.com/models/5",
        "civitai.com/models/6",
        "https://civitai.com/api/download/models/60?token=SECRET123",
        f"{fake.url}/ok.safetensors?token=SECRET123&x=1",
        f"{fake.url}/gone.safetensors?token=SECRET123",
        f"{fake.url}/cut.safetensors?api_key=SECRET123",
        f"{fake.url}/page.safetensors?sig=SECRET123",
        f"http://user:hunter2pass@{host}/gone.safetensors",
        f"http://user:hunter2pass@{host}/ok.safetensors",
    ]
    shown: list[str] = []
    outcomes = []
    for text in texts:
        lora_ref = ref(text, fake)
        try:
            got = fetcher.fetch(lora_ref, INPUT)
        except (InputError, DownloadError) as err:
            shown.append(error_text(err))
            outcomes.append(type(err).__name__)
        else:
            shown.append(repr(got))
            outcomes.append("ok")
    assert outcomes.count("ok") == 5, outcomes  # the failures are real failures, not all of them
    shown += [r.getMessage() for r in caplog.records] + [caplog.text]
    shown += [p.read_text() for p in cache.root.rglob("meta.json")]
    everything = "\n".join(shown)
    for secret in SECRETS:
        assert secret not in everything
    # The credentials were really used where they belong.
    assert fake.requests("/ok.safetensors")[-1].headers["authorization"].startswith("Basic ")
    assert fake.requests("/api/download/models/50")[0].headers["authorization"] == "Bearer SECRETCIVITAI"
