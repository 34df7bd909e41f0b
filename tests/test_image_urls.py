"""`image` and `mask` given as http(s) URLs, through the real server: fetched by our downloader
under the address policy, never by cog, and every failure precise and survivable.

Two loopback hosts stand for the two sides of the policy: 127.0.0.2 is allowed
(`FLUX_LORA_ALLOW_PRIVATE_URLS=127.0.0.2`), as a public host would be, and 127.0.0.1 is not, as
a service on the container's own network. Linux routes all of 127/8 to the loopback device.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from PIL import Image

from flux_lora.dev.cog_server import CogServer
from flux_lora.errors import ConfigError
from flux_lora.http import EVERY_NETWORK, allowed_private_networks
from flux_lora.images import MAX_IMAGE_BYTES
from tests.conftest import NO_SERVICES, becomes_ready, open_image, output_images, predict_failed, predict_ok
from tests.fakes import FakeServer

IMAGE_FAST = {"num_inference_steps": 1, "prompt_strength": 1.0, "seed": 7}
SECRET = "imgtoken-6d1f0c"  # must appear in no log line and no message


class World(NamedTuple):
    public: FakeServer  # 127.0.0.2, allowed
    private: FakeServer  # 127.0.0.1, refused
    server: CogServer
    log_path: Path


def png(size: tuple[int, int], colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def world(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    folder = tmp_path_factory.mktemp("image-urls")
    with FakeServer("127.0.0.2") as public, FakeServer("127.0.0.1") as private:
        public.file("/cat.png", png((96, 64)))
        public.file("/mask.png", png((96, 64), (255, 255, 255)))
        public.file("/signed.png", png((64, 64)))
        public.status("/missing.png", 404)
        public.status("/forbidden.png", 403)
        public.file(
            "/page.png", b"<!doctype html><title>Sign in</title>", headers={"Content-Type": "text/html"}
        )
        public.redirect("/to-private.png", f"{private.url}/secret.png")
        public.endless("/announced-huge.png", total=1024, announce=MAX_IMAGE_BYTES + 1)
        public.endless("/unannounced-huge.png", total=MAX_IMAGE_BYTES + (1 << 20))
        public.stall("/stall.png", png((64, 64)), seconds=30)
        private.file("/secret.png", png((64, 64)))
        env = {
            "FLUX_MODEL_DIR": str(tiny_model_dir),
            "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
            "FLUX_LORA_ALLOW_PRIVATE_URLS": "127.0.0.2",
            "FLUX_LORA_DOWNLOAD_TIMEOUT_S": "1",
            **NO_SERVICES,
        }
        log_path = folder / "coglet.log"
        with CogServer(env=env, log_path=log_path) as server:
            assert server.start()["status"] == "READY"
            yield World(public, private, server, log_path)


def failure(world: World, **inputs) -> str:
    message = predict_failed(world.server, prompt="a cat", **IMAGE_FAST, **inputs)
    assert becomes_ready(world.server)
    return message.partition("Error: ")[2]


def test_img2img_and_inpaint_from_urls(world: World):
    body = predict_ok(world.server, prompt="a cat", image=f"{world.public.url}/cat.png", **IMAGE_FAST)
    assert [open_image(data).size for _, data in output_images(body)] == [(96, 64)]
    body = predict_ok(
        world.server,
        prompt="a cat",
        image=f"{world.public.url}/cat.png",
        mask=f"{world.public.url}/mask.png",
        **IMAGE_FAST,
    )
    assert [open_image(data).size for _, data in output_images(body)] == [(96, 64)]
    # Fetched by our downloader (its User-Agent), not by cog's requests-based one.
    assert {
        seen.headers.get("user-agent", "").split(" ")[0] for seen in world.public.requests("/(cat|mask).png")
    } == {"flux-lora"}


@pytest.mark.parametrize("field", ["image", "mask"])
def test_a_url_on_the_containers_own_network_is_never_fetched(world: World, field: str):
    before = world.private.count()
    inputs = {"image": f"{world.public.url}/cat.png", field: f"{world.private.url}/secret.png"}
    message = failure(world, **inputs)
    assert message.startswith(f"{field}: {world.private.url}/secret.png: refusing to download from 127.0.0.1")
    assert "URLs must point to public addresses" in message
    assert world.private.count() == before  # not even connected to


def test_a_redirect_to_the_containers_own_network_is_refused(world: World):
    before = world.private.count()
    message = failure(world, image=f"{world.public.url}/to-private.png")
    assert "refusing to download from 127.0.0.1" in message
    assert world.private.count() == before


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/missing.png", "not found (404): check the URL"),
        ("/forbidden.png", "refused (403): the URL needs credentials"),
        ("/page.png", "the 37 bytes received (they begin b'<!doctyp') are not an image"),
        ("/announced-huge.png", "the file is larger than the 64 MiB limit"),
        ("/unannounced-huge.png", "the file is larger than the 64 MiB limit"),
        ("/stall.png", "the download timed out"),
    ],
)
def test_bad_image_urls_fail_precisely_and_the_server_stays_ready(world: World, path: str, expected: str):
    message = failure(world, image=f"{world.public.url}{path}")
    assert expected in message, message
    assert message.startswith("image: "), message


@pytest.mark.parametrize("value", ["file:///etc/passwd", "ftp://127.0.0.2/cat.png", "/etc/passwd", "cat.png"])
def test_other_schemes_and_paths_are_refused(world: World, value: str):
    message = failure(world, image=value)
    assert message.startswith(f"image: {value!r} is not a URL."), message
    assert world.private.count("/etc/passwd") == 0


def test_a_token_in_an_image_url_stays_out_of_logs_and_messages(world: World):
    body = predict_ok(
        world.server, prompt="a cat", image=f"{world.public.url}/signed.png?token={SECRET}", **IMAGE_FAST
    )
    assert "token=***" in body["logs"]
    message = failure(world, image=f"{world.public.url}/missing.png?token={SECRET}")
    assert "token=***" in message
    assert SECRET not in body["logs"] + message
    assert SECRET not in world.log_path.read_text()
    assert world.public.requests("/signed.png")[-1].query == {"token": SECRET}  # sent, only on the wire


def test_the_private_address_setting():
    assert allowed_private_networks(None) == allowed_private_networks("0") == ()
    assert allowed_private_networks("1") == EVERY_NETWORK
    allowed = allowed_private_networks(" 10.1.0.0/16, 127.0.0.2 ")
    assert ipaddress.ip_address("10.1.200.3") in allowed[0]
    assert [str(network) for network in allowed] == ["10.1.0.0/16", "127.0.0.2/32"]
    with pytest.raises(ConfigError, match=r"^FLUX_LORA_ALLOW_PRIVATE_URLS='yes': .* Set it to 1"):
        allowed_private_networks("yes")
