"""LoRAs end to end: the real Cog server fetching from loopback servers that speak Replicate's,
the Hugging Face Hub's and CivitAI's protocols, applying what it fetched to the tiny model."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.testing import tiny
from tests.conftest import output_images, predict_failed, predict_ok
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
)

SECRETS = {
    "HF_TOKEN": "hf_SECRET_hub_0001",
    "REPLICATE_API_TOKEN": "r8_SECRET_rep_0002",
    "CIVITAI_API_TOKEN": "civ_SECRET_0003",
}
URL_SECRET = "SECRET_in_url_0004"
FAST = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 9, "output_format": "png"}
LORA = {seed: tiny.random_lora(seed=seed) for seed in range(1, 8)}


class World:
    """The loopback services and the server that uses them."""

    def __init__(self, api: FakeServer, storage: FakeServer, server: CogServer, log_path: Path):
        self.api, self.storage, self.server, self.log_path = api, storage, server, log_path
        self.bodies: list[str] = []  # every response, for the secrets check

    def image(self, **inputs) -> bytes:
        body = predict_ok(self.server, **{**FAST, **inputs})
        self.bodies.append(repr(body))
        return output_images(body)[0][1]

    def body(self, **inputs) -> dict:
        body = predict_ok(self.server, **{**FAST, **inputs})
        self.bodies.append(repr(body))
        return body

    def error(self, **inputs) -> str:
        error = predict_failed(self.server, **{**FAST, **inputs})
        self.bodies.append(error)
        return error


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("lora-world")
    with FakeServer() as api, FakeServer("127.0.0.2") as storage:
        add_replicate(
            api, storage, "alice/cats", make_replicate_tar(LORA[1]), token=SECRETS["REPLICATE_API_TOKEN"]
        )
        add_hub(
            api,
            [
                HubRepo("bob/style", {"lora.safetensors": LORA[2], "README.md": b"# style"}),
                HubRepo("bob/multi", {"a.safetensors": LORA[3], "b.safetensors": LORA[4]}),
                HubRepo("bob/gated", {"lora.safetensors": LORA[5]}, token=SECRETS["HF_TOKEN"]),
            ],
        )
        add_civitai(
            api,
            storage,
            {
                100: [CivitaiVersion(102, LORA[6]), CivitaiVersion(101, LORA[3])],
                200: [CivitaiVersion(201, LORA[7], token=URL_SECRET)],
            },
        )
        api.file("/files/plain.safetensors", LORA[4])
        api.status("/files/missing.safetensors", 404)
        api.file("/files/page.safetensors", b"<!doctype html><html><body>Log in</body></html>")
        api.file("/files/sdxl.safetensors", make_safetensors(_sdxl_tensors()))
        api.status("/files/private.safetensors", 401)
        api.truncated("/files/cut.safetensors", LORA[4][:5000], claimed=len(LORA[4]))
        api.endless("/files/huge.safetensors", total=1 << 20, announce=3 * 1024**3)  # claims 3 GiB
        api.status("/files/forbidden.safetensors", 403)
        api.status("/files/broken.safetensors", 500)
        api.stall("/files/stall.safetensors", LORA[4], seconds=30)
        api.file("/files/header-claims-gigabytes.safetensors", (10**10).to_bytes(8, "little") + b"{}")
        for kind in ("dotdot", "absolute", "symlink", "two"):
            api.file(f"/files/{kind}.tar", hostile_tar(kind, LORA[4])[0])
        env = {
            "FLUX_MODEL_DIR": str(tiny_model_dir),
            "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
            "HF_HOME": str(folder / "hf-home"),
            "FLUX_LORA_REPLICATE_URL": api.url,
            "HF_ENDPOINT": api.url,
            "FLUX_LORA_CIVITAI_URL": api.url,
            "FLUX_LORA_ALLOW_PRIVATE_URLS": "1",
            "FLUX_LORA_DOWNLOAD_TIMEOUT_S": "1",
            **SECRETS,
        }
        log_path = folder / "coglet.log"
        with CogServer(env=env, log_path=log_path) as server:
            assert server.start()["status"] == "READY"
            yield World(api, storage, server, log_path)


def _sdxl_tensors():
    import torch

    return {
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 640),
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(640, 4),
    }


SOURCES = {
    "replicate": "alice/cats",
    "replicate version": "alice/cats/versions/abc123",
    "hugging face repo": "huggingface.co/bob/style",
    "hugging face file": "https://huggingface.co/bob/multi/resolve/main/b.safetensors",
    "hugging face gated": "huggingface.co/bob/gated",
    "civitai model": "https://civitai.com/models/100/cats",
    "civitai version": "civitai.com/models/100?modelVersionId=101",
    "plain url": "PLAIN",
    "data url": bytes_to_data_uri(LORA[4]),
}


def _reference(world: World, text: str) -> str:
    return f"{world.api.url}/files/plain.safetensors" if text == "PLAIN" else text


@pytest.mark.parametrize("source", list(SOURCES))
def test_each_source_applies_at_scale_one_and_not_at_zero(world: World, source: str):
    base = world.image()
    reference = _reference(world, SOURCES[source])
    assert world.image(replicate_weights=reference, lora_scale=1.0) != base
    assert world.image(replicate_weights=reference, lora_scale=0.0) == base


def test_second_use_comes_from_the_cache_without_network(world: World):
    first = world.body(replicate_weights="huggingface.co/bob/style")
    requests_before = len(world.api.seen) + len(world.storage.seen)
    world.body()  # unload it, so the next request really loads from the cache
    again = world.body(replicate_weights="huggingface.co/bob/style")
    assert len(world.api.seen) + len(world.storage.seen) == requests_before
    assert again["metrics"]["lora_from_cache"] == 1
    assert first["metrics"]["lora_load_time"] > 0 and again["metrics"]["lora_load_time"] > 0


def test_civitai_model_id_takes_the_newest_version(world: World):
    newest = world.image(replicate_weights="civitai.com/models/100")
    assert world.api.count(r"/api/v1/models/100") >= 1
    assert world.api.count(r"/api/download/models/102") >= 1
    assert newest == world.image(replicate_weights="civitai.com/models/100?modelVersionId=102")
    assert newest != world.image(replicate_weights="civitai.com/models/100?modelVersionId=101")


def test_replicate_token_is_sent_to_replicate_and_the_trigger_word_hint(world: World):
    logs = world.body(replicate_weights="alice/cats", prompt="a cat")["logs"]
    assert "Hint: replicate_weights was trained with the trigger word 'TOK'" in logs
    assert "Hint" not in world.body(replicate_weights="alice/cats", prompt="a TOK cat")["logs"]
    weights_requests = world.api.requests(r"/alice/cats(/versions/\w+)?/_weights")
    assert weights_requests and all(r.headers.get("authorization") for r in weights_requests)
    assert all("authorization" not in r.headers for r in world.storage.requests(r"/replicate-storage/.*"))


def test_main_and_extra_combine(world: World):
    main = world.image(replicate_weights="alice/cats")
    extra = world.image(extra_lora="huggingface.co/bob/style")
    both = world.image(replicate_weights="alice/cats", extra_lora="huggingface.co/bob/style")
    assert len({main, extra, both}) == 3
    assert (
        world.image(replicate_weights="alice/cats", extra_lora="huggingface.co/bob/style", extra_lora_scale=0)
        == main
    )


def test_go_fast_multiplies_both_scales_when_fp8_runs(world: World):
    loras = {"replicate_weights": "alice/cats", "extra_lora": "huggingface.co/bob/style"}
    body = world.body(**loras, go_fast=True)
    assert "go_fast: LoRA scales x1.5" in body["logs"]
    assert world.image(**loras, go_fast=True, extra_lora_scale=0.5) != output_images(body)[0][1]
    # Custom sizes run without fp8, so without the multiplier: identical to go_fast=false.
    custom = {"aspect_ratio": "custom", "width": 256, "height": 256}
    assert world.image(**loras, **custom, go_fast=True) == world.image(**loras, **custom)


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        ({"replicate_weights": "PLAIN_MISSING"}, ["replicate_weights", "404"]),
        ({"replicate_weights": "UNAUTHORIZED"}, ["replicate_weights", "401"]),
        ({"replicate_weights": "CUT"}, ["replicate_weights", "cut off after 5000 of"]),
        ({"extra_lora": "HUGE"}, ["extra_lora", "larger than the 2 GiB limit"]),
        ({"replicate_weights": "FORBIDDEN"}, ["replicate_weights", "403"]),
        ({"replicate_weights": "BROKEN"}, ["replicate_weights", "500", "try again later"]),
        ({"replicate_weights": "STALL"}, ["replicate_weights", "timed out"]),
        ({"replicate_weights": "CLAIMS_GB"}, ["not a safetensors file", "header claims 10000000000 bytes"]),
        ({"replicate_weights": "DOTDOT"}, ["replicate_weights", "'..'"]),
        ({"replicate_weights": "ABSOLUTE"}, ["replicate_weights", "an absolute path"]),
        ({"replicate_weights": "SYMLINK"}, ["replicate_weights", "a link"]),
        ({"replicate_weights": "TWO"}, ["replicate_weights", "several .safetensors files"]),
        ({"replicate_weights": "file:///etc/passwd"}, ["the file: scheme is not supported"]),
        ({"extra_lora": "ftp://127.0.0.1/l.safetensors"}, ["extra_lora", "the ftp: scheme is not supported"]),
        ({"extra_lora": "PAGE"}, ["extra_lora", "not a safetensors file"]),
        ({"replicate_weights": "SDXL"}, ["replicate_weights", "FLUX"]),
        (
            {"replicate_weights": "huggingface.co/bob/multi"},
            ["a.safetensors", "b.safetensors", "resolve/main/"],
        ),
        ({"replicate_weights": "huggingface.co/bob/nope"}, ["replicate_weights", "not found"]),
        ({"replicate_weights": "civitai.com/models/999"}, ["replicate_weights", "999"]),
        ({"replicate_weights": "https://example.com/model.ckpt"}, ["pickle"]),
        ({"replicate_weights": "/etc/passwd"}, ["local path"]),
    ],
)
def test_bad_loras_fail_precisely_and_leave_the_base_model_intact(world: World, inputs, fragments):
    base = world.image()
    world.image(replicate_weights="alice/cats")  # something loaded before the failure
    files = {
        "PLAIN_MISSING": "/files/missing.safetensors",
        "PAGE": "/files/page.safetensors",
        "SDXL": "/files/sdxl.safetensors",
        "UNAUTHORIZED": "/files/private.safetensors",
        "CUT": "/files/cut.safetensors",
        "HUGE": "/files/huge.safetensors",
        "FORBIDDEN": "/files/forbidden.safetensors",
        "BROKEN": "/files/broken.safetensors",
        "STALL": "/files/stall.safetensors",
        "CLAIMS_GB": "/files/header-claims-gigabytes.safetensors",
        "DOTDOT": "/files/dotdot.tar",
        "ABSOLUTE": "/files/absolute.tar",
        "SYMLINK": "/files/symlink.tar",
        "TWO": "/files/two.tar",
    }
    inputs = {k: f"{world.api.url}{files[v]}" if v in files else v for k, v in inputs.items()}
    error = world.error(**inputs)
    for fragment in fragments:
        assert fragment in error, error
    assert world.image() == base


def test_civitai_token_in_the_url_works_and_never_shows(world: World):
    reference = f"https://civitai.com/api/download/models/201?type=Model&token={URL_SECRET}"
    assert world.image(replicate_weights=reference) != world.image()


def test_no_secret_in_any_log_or_response(world: World):
    """Runs last in this module (pytest keeps file order): every request above used the tokens."""
    world.body(replicate_weights="huggingface.co/bob/gated")
    # Credentials under other names, in a query, a fragment and userinfo, in a request that fails.
    named = {name: f"{URL_SECRET}_{name}" for name in ("hf_token", "password", "private_token", "api_key")}
    query = "&".join(f"{name}={value}" for name, value in named.items())
    world.error(
        extra_lora=f"http://me:{URL_SECRET}_pw@127.0.0.1:9/l.safetensors?{query}#token={URL_SECRET}_f"
    )
    world.error(image=f"ftp://me:{URL_SECRET}_ftp@127.0.0.1:9/x.png?{query}")
    texts = [world.log_path.read_text(errors="replace"), *world.bodies]
    for secret in [*SECRETS.values(), URL_SECRET, *named.values()]:
        for text in texts:
            assert secret not in text


def test_cog_weights_is_the_default_main_lora_and_private_urls_are_refused(
    tiny_model_dir, tmp_path, world: World
):
    trained = tmp_path / "trained_model.tar"
    trained.write_bytes(make_replicate_tar(LORA[1]))
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
        "COG_WEIGHTS": str(trained),
    }
    with CogServer(env=env) as server:
        health = server.start()
        assert health["status"] == "READY", health
        assert re.search(r"COG_WEIGHTS: .*trained_model.tar loaded into \d+ layers", health["setup"]["logs"])
        own = output_images(predict_ok(server, **FAST))[0][1]
        assert own == world.image(replicate_weights="alice/cats")  # same LoRA, same seed, another server
        other = output_images(predict_ok(server, **FAST, replicate_weights=bytes_to_data_uri(LORA[2])))[0][1]
        assert other != own
        refused = predict_failed(server, **FAST, replicate_weights=f"{world.api.url}/files/plain.safetensors")
        assert "private" in refused or "loopback" in refused, refused
        assert output_images(predict_ok(server, **FAST))[0][1] == own


@pytest.mark.slow
def test_cog_weights_that_cannot_be_fetched_fails_setup(tiny_model_dir, tmp_path):
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path),
        "COG_WEIGHTS": str(tmp_path / "none.tar"),
    }
    with CogServer(env=env) as server:
        health = server.start()
        assert health["status"] == "SETUP_FAILED"
        assert "COG_WEIGHTS" in health["setup"]["logs"] and "none.tar" in health["setup"]["logs"]
