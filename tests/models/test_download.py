"""scripts/download-weights and flux_lora.models.download against a loopback Hugging Face Hub that
serves the tiny model's files in the layout of the real repos, with the real repos' decoys."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import constants as hf_constants

from flux_lora.dev.cog_server import CogServer
from flux_lora.errors import DownloadError, ModelNotFoundError
from flux_lora.models.download import STAGING, download_models
from flux_lora.models.files import MARKER, missing_models, select_files, verify_models
from flux_lora.models.layout import MODEL_REPOS, REPO_ROOT
from tests.conftest import predict_ok
from tests.fakes import (
    Exchange,
    FakeServer,
    HubRepo,
    add_hub,
    add_hub_files_metadata,
    make_safetensors,
    unresolvable,
)

ROOT = REPO_ROOT
TOKEN = "hf_SECRETdownloadTOKEN42"
DEV, SCHNELL, CHECKER, NSFW = MODEL_REPOS
TRANSFORMER = "transformer/diffusion_pytorch_model.safetensors"
# Files of the real repos the pipeline never reads: none may be requested.
DECOYS = {
    DEV: ["flux1-dev.safetensors", "ae.safetensors", "dev_grid.jpg", "LICENSE.md", ".gitattributes"],
    SCHNELL: ["flux1-schnell.safetensors", "ae.safetensors", "schnell_grid.jpeg", "LICENSE.md"],
    CHECKER: ["pytorch_model.bin"],
    NSFW: ["pytorch_model.bin", "falconsai_yolov9_nsfw_model_quantized.pt"],
}
DECOY_PATHS = r".*/(flux1-(dev|schnell)|ae)\.safetensors|.*\.(bin|pt|jpe?g|md)|.*/\.gitattributes"


def source_files(tiny_model_dir: Path, folder: str) -> dict[str, bytes]:
    base = tiny_model_dir / folder
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sources(tiny_model_dir: Path) -> dict[str, dict[str, bytes]]:
    return {folder: source_files(tiny_model_dir, folder) for folder in MODEL_REPOS}


@pytest.fixture(scope="module")
def repos(sources: dict[str, dict[str, bytes]]) -> list[HubRepo]:
    def decoy(name: str) -> bytes:
        return make_safetensors() if name.endswith(".safetensors") else b"decoy: never fetched\n"

    return [
        HubRepo(
            repo_id,
            files={**sources[folder], **{name: decoy(name) for name in DECOYS[folder]}},
            token=TOKEN if folder == DEV else None,
            sha=hashlib.sha1(repo_id.encode()).hexdigest(),
        )
        for folder, repo_id in MODEL_REPOS.items()
    ]


@pytest.fixture
def hub(repos: list[HubRepo]) -> Iterator[FakeServer]:
    with FakeServer() as server:
        add_hub(server, repos)
        add_hub_files_metadata(server, repos)
        yield server


@pytest.fixture
def plain_hub(repos: list[HubRepo]) -> Iterator[FakeServer]:
    """A hub whose listing gives names only, no sizes."""
    with FakeServer() as server:
        add_hub(server, repos)
        yield server


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "FLUX_MODEL_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token, no shared cache
    # Else huggingface_hub fetches an "agent harness" list from huggingface.co on its first request.
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")  # the same for the scripts run here


def resolve_path(folder: str, name: str) -> str:
    repo_id = MODEL_REPOS[folder]
    return f"/{repo_id}/resolve/{hashlib.sha1(repo_id.encode()).hexdigest()}/{name}"


def gets(hub: FakeServer, since: int = 0) -> list[str]:
    return [s.path for s in hub.seen[since:] if s.method == "GET" and "/resolve/" in s.path]


def assert_same_files(root: Path, sources: dict[str, dict[str, bytes]], folders=MODEL_REPOS) -> None:
    for folder in folders:
        on_disk = source_files(root, folder)
        assert on_disk.pop(MARKER, None) is not None, f"{folder} has no completion marker"
        assert on_disk == sources[folder], folder


def serve(ex: Exchange, data: bytes, sha: str) -> None:
    """A /resolve/ answer like the Hub's, honouring `Range: bytes=N-`."""
    headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": sha}
    start = int(m[1]) if (m := re.fullmatch(r"bytes=(\d+)-", ex.headers.get("range", ""))) else 0
    if start:
        headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
    ex.send(206 if start else 200, data[start:], headers)


# --- choosing files ----------------------------------------------------------------------------

REAL_DEV_LISTING = [
    ".gitattributes", "LICENSE.md", "README.md", "ae.safetensors", "dev_grid.jpg",
    "flux1-dev.safetensors", "model_index.json", "scheduler/scheduler_config.json",
    "text_encoder/config.json", "text_encoder/model.safetensors", "text_encoder_2/config.json",
    "text_encoder_2/model-00001-of-00002.safetensors", "text_encoder_2/model-00002-of-00002.safetensors",
    "text_encoder_2/model.safetensors.index.json", "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json", "tokenizer/tokenizer_config.json", "tokenizer/vocab.json",
    "tokenizer_2/special_tokens_map.json", "tokenizer_2/spiece.model", "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json", "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
    "transformer/diffusion_pytorch_model-00003-of-00003.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]  # fmt: skip


def test_selection_is_what_the_pipeline_loads(caplog: pytest.LogCaptureFixture):
    chosen = select_files(DEV, REAL_DEV_LISTING)
    skipped = {
        ".gitattributes",
        "LICENSE.md",
        "README.md",
        "ae.safetensors",
        "dev_grid.jpg",
        "flux1-dev.safetensors",
    }
    assert chosen == sorted(set(REAL_DEV_LISTING) - skipped)

    configs = ["README.md", "config.json", "preprocessor_config.json"]
    assert select_files(CHECKER, [*configs, "model.safetensors", "pytorch_model.bin"]) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    shards = [
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
    assert select_files(NSFW, [*configs, *shards, "pytorch_model.bin"]) == sorted(
        ["config.json", "preprocessor_config.json", *shards]
    )
    with caplog.at_level(logging.INFO, logger="flux_lora.models.download"):
        assert select_files(CHECKER, [*configs, "pytorch_model.bin", "flax_model.msgpack"]) == [
            "config.json",
            "preprocessor_config.json",
            "pytorch_model.bin",
        ]
    assert "has no model.safetensors; fetching pytorch_model.bin instead" in caplog.text

    with pytest.raises(DownloadError, match=r"has no model_index.json"):
        select_files(SCHNELL, ["flux1-schnell.safetensors", "README.md"])
    with pytest.raises(DownloadError, match=r"has no model.safetensors \(or pytorch_model.bin\)"):
        select_files(NSFW, configs)


# --- downloading -------------------------------------------------------------------------------


def test_download_into_an_empty_folder_then_load(hub, sources, tmp_path, capfd):
    root = tmp_path / "weights"
    assert missing_models(root) == list(MODEL_REPOS)

    download_models(root, token=TOKEN, endpoint=hub.url)

    assert missing_models(root) == []
    assert_same_files(root, sources)
    verify_models(root, load=True)
    assert sorted(p.name for p in root.iterdir()) == sorted(MODEL_REPOS)  # no staging, no .cache left
    # One listing per repo; every file the pipeline loads fetched once, but those of FLUX.1-schnell
    # that FLUX.1-dev has (their content ids match): hard links to dev's. No decoy asked for.
    assert hub.count(r"/api/models/.*") == len(MODEL_REPOS)
    as_dev = {name for name, data in sources[SCHNELL].items() if sources[DEV].get(name) == data}
    assert {"text_encoder_2/model.safetensors", "vae/diffusion_pytorch_model.safetensors"} <= as_dev
    assert TRANSFORMER not in as_dev
    fetched = gets(hub)
    wanted = [(f, name) for f in MODEL_REPOS for name in sources[f] if not (f == SCHNELL and name in as_dev)]
    assert sorted(fetched) == sorted(resolve_path(f, name) for f, name in wanted)
    assert all((root / SCHNELL / name).samefile(root / DEV / name) for name in as_dev)
    assert not [s.path for s in hub.seen if re.fullmatch(DECOY_PATHS, s.path)]
    bars = capfd.readouterr().err
    assert "FLUX.1-dev" in bars and "100%" in bars, bars

    # Complete: a second run asks the hub nothing.
    before = len(hub.seen)
    download_models(root, token=TOKEN, endpoint=hub.url)
    assert len(hub.seen) == before

    # A file lost from a complete folder: the folder is missing again, and only that file is
    # fetched; or linked again, where the other release has it.
    (root / SCHNELL / TRANSFORMER).unlink()
    (root / SCHNELL / "vae/diffusion_pytorch_model.safetensors").unlink()
    assert missing_models(root) == [SCHNELL]
    download_models(root, token=TOKEN, endpoint=hub.url, progress=False)
    assert gets(hub, before) == [resolve_path(SCHNELL, TRANSFORMER)]
    assert missing_models(root) == []
    assert_same_files(root, sources)


def test_without_content_ids_in_the_listing_every_file_is_fetched(plain_hub, sources, tmp_path):
    """A listing that gives names only says nothing of what is the same: nothing is linked."""
    root = tmp_path / "weights"
    download_models(root, token=TOKEN, endpoint=plain_hub.url, folders=[DEV, SCHNELL], progress=False)
    fetched = gets(plain_hub)
    assert sorted(fetched) == sorted(resolve_path(f, name) for f in (DEV, SCHNELL) for name in sources[f])
    assert not (root / SCHNELL / "vae/diffusion_pytorch_model.safetensors").samefile(
        root / DEV / "vae/diffusion_pytorch_model.safetensors"
    )
    assert_same_files(root, sources, [DEV, SCHNELL])


def test_gated_repo_without_token_fails_before_fetching_anything(plain_hub, sources, tmp_path, caplog):
    hub = plain_hub
    root = tmp_path / "weights"
    with pytest.raises(DownloadError) as caught:
        download_models(root, endpoint=hub.url, progress=False)
    page = f"{hub.url}/black-forest-labs/FLUX.1-dev"
    assert str(caught.value) == (
        "FLUX.1-dev (black-forest-labs/FLUX.1-dev) is gated and no HF_TOKEN is set. Accept its licence on "
        f"its Hugging Face page, {page}, then set HF_TOKEN to a read token of that account "
        f"({hub.url}/settings/tokens) and run again."
    )
    assert not [s for s in hub.seen if "/resolve/" in s.path]
    assert not root.exists()

    # The other repos are public: they come without a token.
    others = [SCHNELL, CHECKER, NSFW]
    with caplog.at_level(logging.INFO, logger="flux_lora.models.download"):
        download_models(root, endpoint=hub.url, folders=others, progress=False)
    assert "FLUX.1-schnell <- black-forest-labs/FLUX.1-schnell @ " in caplog.text
    assert "size not reported" in caplog.text
    assert missing_models(root) == [DEV]
    assert_same_files(root, sources, others)
    assert not [s for s in hub.seen if "authorization" in s.headers]


def test_a_refused_token_is_named_as_such(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_WRONGtoken")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    with pytest.raises(DownloadError) as caught:
        download_models(tmp_path / "weights", progress=False)
    page = f"{hub.url}/black-forest-labs/FLUX.1-dev"
    assert str(caught.value) == (
        "FLUX.1-dev (black-forest-labs/FLUX.1-dev) refused: the token's account has not accepted the "
        f"FLUX.1-dev licence, or the token is invalid (HTTP 403). Accept the licence on {page} with the "
        f"account HF_TOKEN belongs to, or check the token at {hub.url}/settings/tokens."
    )
    assert gets(hub) == []  # one HEAD told; nothing fetched
    assert [s.headers.get("authorization") for s in hub.seen if "/resolve/" in s.path] == [
        "Bearer hf_WRONGtoken"
    ]


def test_an_unreachable_hub_says_so(tmp_path):
    with pytest.raises(DownloadError) as caught:
        download_models(tmp_path / "weights", token=TOKEN, endpoint="http://127.0.0.1:9", progress=False)
    assert str(caught.value) == (
        "FLUX.1-dev (black-forest-labs/FLUX.1-dev): could not be downloaded from http://127.0.0.1:9 "
        "(ConnectError: [Errno 111] Connection refused); run again: the files already complete are kept "
        "and not fetched again"
    )


def test_a_file_whose_size_differs_from_the_listing_is_refused(hub, repos, tmp_path):
    path = resolve_path(NSFW, "model.safetensors")
    hub.route(re.escape(path), lambda ex: serve(ex, b"x" * 10, repos[3].sha))
    root = tmp_path / "weights"
    with pytest.raises(
        DownloadError,
        match=r"model.safetensors from Falconsai/nsfw_image_detection has 10 bytes, not the \d+ the Hub lists",
    ):
        download_models(root, endpoint=hub.url, folders=[NSFW], progress=False)
    assert missing_models(root) == list(MODEL_REPOS)
    assert not (root / STAGING / NSFW / "model.safetensors").exists()


def test_a_connection_cut_mid_file_resumes_with_a_range_request(hub, repos, sources, tmp_path, monkeypatch):
    # huggingface_hub writes what it received in chunks of DOWNLOAD_CHUNK_SIZE (10 MB) and resumes
    # from the last whole chunk: make the chunks small enough for the tiny file to hold several.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 16 * 1024)
    data = sources[DEV][TRANSFORMER]
    cut = len(data) // 2
    kept = cut // (16 * 1024) * 16 * 1024
    path = resolve_path(DEV, TRANSFORMER)

    def cut_once(ex: Exchange) -> None:
        if ex.seen.method == "GET" and hub.count(re.escape(path)) <= 2:  # the HEAD, then this GET
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repos[0].sha}
            ex.start(200, headers, len(data))
            ex.write(data[:cut])
            ex.handler.close_connection = True  # half way through the body
            return
        serve(ex, data, repos[0].sha)

    hub.route(re.escape(path), cut_once)
    root = tmp_path / "weights"
    download_models(root, token=TOKEN, endpoint=hub.url, folders=[DEV], progress=False)

    ranges = [s.headers.get("range") for s in hub.requests(re.escape(path)) if s.method == "GET"]
    assert ranges == [None, f"bytes={kept}-"]
    assert hub.sent[path] == cut + len(data) - kept  # the second request sent only the rest
    assert_same_files(root, sources, [DEV])


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "Ctrl-C"])
def test_an_interrupted_download_resumes_without_fetching_complete_files_again(
    hub, repos, sources, tmp_path, sig
):
    data = sources[DEV][TRANSFORMER]
    path = resolve_path(DEV, TRANSFORMER)
    release = threading.Event()

    def stall_once(ex: Exchange) -> None:
        if (
            ex.seen.method == "GET"
            and len([s for s in hub.requests(re.escape(path)) if s.method == "GET"]) == 1
        ):
            ex.start(
                200,
                {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": repos[0].sha},
                len(data),
            )
            ex.write(data[:1000])
            release.wait(30)
            ex.handler.close_connection = True
            return
        serve(ex, data, repos[0].sha)

    hub.route(re.escape(path), stall_once)
    root = tmp_path / "weights"
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "FLUX_MODEL_DIR": str(root),
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "flux_lora.models.download", "--only", DEV, "--no-progress"]
    process = subprocess.Popen(
        command,
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # As from a terminal: a shell that starts the suite in the background without job control
        # hands it SIGINT ignored, and the child would inherit that and never see the Ctrl-C.
        preexec_fn=_default_sigint,
    )
    staging = root / STAGING / DEV
    others = [name for name in sources[DEV] if name != TRANSFORMER]
    try:
        deadline = time.monotonic() + 30
        while not (hub.sent.get(path) and all((staging / name).is_file() for name in others)):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the download never got half way"
            time.sleep(0.05)
        process.send_signal(sig)
        # Ctrl-C leaves at once, though a file is still in flight (the hub holds it for 30 s).
        assert process.wait(10) == (130 if sig == signal.SIGINT else -sig)
        stderr = process.stderr.read().decode()
    finally:
        release.set()
        process.kill()
        process.stderr.close()
    if sig == signal.SIGINT:
        assert stderr.endswith("download-weights: interrupted; run it again to resume\n"), stderr

    assert missing_models(root) == list(MODEL_REPOS)  # the half-fetched folder is not in place
    assert not (root / DEV).exists()
    assert list((staging / ".cache").rglob("*.incomplete")), "the killed run left no partial file"

    before = len(hub.seen)
    download_models(root, endpoint=hub.url, token=TOKEN, folders=[DEV], progress=False)
    assert gets(hub, before) == [path]  # the complete files were neither fetched nor asked about
    heads = [s.path for s in hub.seen[before:] if s.method == "HEAD"]
    assert heads == [resolve_path(DEV, "model_index.json"), path]  # the access check, then the file
    assert_same_files(root, sources, [DEV])
    assert not (root / STAGING).exists()


# --- checking ----------------------------------------------------------------------------------


def test_verify_names_the_missing_or_damaged_file(tiny_model_dir, tmp_path):
    root = tmp_path / "weights"
    shutil.copytree(tiny_model_dir, root)
    verify_models(root)  # put there by hand, no marker: the layout is what counts
    assert missing_models(root) == []
    verify_models(root, folders=[SCHNELL, NSFW], load=True)  # each without its pair

    encoder = root / DEV / "text_encoder_2"
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (encoder / "model.safetensors").rename(encoder / "model-00001-of-00002.safetensors")
    (encoder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert missing_models(root) == [DEV]
    with pytest.raises(ModelNotFoundError) as caught:
        verify_models(root)
    assert str(caught.value) == (
        f"{root / DEV} is incomplete: {encoder / 'model-00002-of-00002.safetensors'} is missing (named by "
        "model.safetensors.index.json); run scripts/download-weights --only FLUX.1-dev"
    )

    shutil.rmtree(root / DEV)
    vae = root / SCHNELL / "vae/diffusion_pytorch_model.safetensors"
    vae.write_bytes(b"<html>Access denied</html>")
    with pytest.raises(
        ModelNotFoundError, match=f"^{re.escape(str(vae))}: .*HTML page.*: delete .*FLUX.1-schnell and run"
    ):
        verify_models(root, folders=[SCHNELL])
    with pytest.raises(
        ModelNotFoundError,
        match=r"FLUX.1-dev is missing \(black-forest-labs/FLUX.1-dev\): run scripts/download-weights --only FLUX.1-dev",
    ):
        verify_models(root)


# --- the script --------------------------------------------------------------------------------


def run_script(
    hub: FakeServer, cwd: Path, *args: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    env.update(HF_ENDPOINT=hub.url, FLUX_MODEL_DIR="weights")  # relative to where it is run
    if token:
        env["HF_TOKEN"] = token
    script = ROOT / "scripts" / "download-weights"
    return subprocess.run([script, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_script_end_to_end(hub, sources, tmp_path):
    root = tmp_path / "weights"
    refused = run_script(hub, tmp_path, "--no-progress", token=None)
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith("and run again."), refused.stderr
    assert (
        "download-weights: FLUX.1-dev (black-forest-labs/FLUX.1-dev) is gated and no HF_TOKEN is set"
        in refused.stderr
    )

    done = run_script(hub, tmp_path, "--no-progress", "--load")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert TOKEN not in output
    assert "\r" not in output and "%|" not in output  # no progress bars
    assert (
        "To fetch into" in output
        and "not fetched (the pipeline does not load them): .gitattributes" in output
    )
    assert "FLUX.1-dev and FLUX.1-schnell: loads" in output
    assert output.strip().endswith("present and load")
    assert_same_files(root, sources)


def test_setup_fetches_missing_weights_when_hf_token_is_set(hub, sources, tmp_path):
    models = tmp_path / "models"
    env = {
        "FLUX_MODEL_DIR": str(models),
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "lora-cache"),
    }
    with CogServer(env=env, log_path=tmp_path / "coglet.log") as server:
        health = server.start()
        assert health["status"] == "READY", health["setup"]["logs"][-2000:]
        assert f"Fetching {', '.join(MODEL_REPOS)} into {models}" in health["setup"]["logs"]
        predict_ok(server, prompt="a cat", num_inference_steps=1, megapixels="0.25")
    assert_same_files(models, sources)
    assert not [path for path in gets(hub) if re.fullmatch(DECOY_PATHS, path)]
    assert TOKEN not in (tmp_path / "coglet.log").read_text()


def test_setup_without_token_names_both_ways_out(tmp_path):
    models = tmp_path / "empty"
    env = {"FLUX_MODEL_DIR": str(models), "HF_TOKEN": "", "HF_ENDPOINT": "http://127.0.0.1:9"}
    with CogServer(env=env) as server:
        health = server.start()
        assert health["status"] == "SETUP_FAILED"
        logs = health["setup"]["logs"]
        assert (
            f"{models} does not hold FLUX.1-dev, FLUX.1-schnell, safety-checker, nsfw-image-detection" in logs
        )
        assert "Either set HF_TOKEN" in logs and "scripts/download-weights" in logs


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_a_hub_whose_name_does_not_resolve_says_so_without_try_again(tmp_path, monkeypatch):
    """A host name with no DNS answer (a machine without network access): retrying cannot help."""
    unresolvable(monkeypatch, "hub.example")
    with pytest.raises(DownloadError) as caught:
        download_models(tmp_path / "weights", token=TOKEN, endpoint="http://hub.example", progress=False)
    message = str(caught.value)
    assert message.startswith(
        "FLUX.1-dev (black-forest-labs/FLUX.1-dev): the host name hub.example cannot be resolved "
        "(Name or service not known). Check the host name"
    ), message
    assert "again" not in message
