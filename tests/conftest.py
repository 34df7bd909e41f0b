"""Fixtures: the tiny model, and the real Cog server (coglet) serving predict.py over HTTP."""

from __future__ import annotations

import os

# huggingface_hub looks things up on huggingface.co on first use unless telemetry is off; tests
# never leave loopback. Set before anything imports it; servers started by tests inherit it.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import base64
import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from flux_lora.dev.cog_server import CogServer, decode_data_uri
from flux_lora.models import layout
from flux_lora.testing import tiny
from tests.fakes import Webhooks


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all",
        action="store_true",
        help="also run the slow tier (tests marked slow: demo training, the compiled path, the "
        "benchmark harness, soak, fuzz, a few servers of their own); ./scripts/test runs without it, "
        "as CI does",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--all"):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return tiny.build(layout.TINY_MODEL_DIR)


# Services a LoRA reference may name, pointed at a closed loopback port: a test that names one by
# mistake fails fast instead of reaching out of the machine.
NO_SERVICES = {
    name: "http://127.0.0.1:9" for name in ("FLUX_LORA_REPLICATE_URL", "HF_ENDPOINT", "FLUX_LORA_CIVITAI_URL")
}


@contextmanager
def serving(model_dir: Path, folder: Path, **extra_env: str) -> Iterator[CogServer]:
    """The real server on `model_dir`, ready, with its LoRA cache and log in `folder`."""
    env = {
        "FLUX_MODEL_DIR": str(model_dir),
        "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
        **NO_SERVICES,
        **extra_env,
    }
    with CogServer(env=env, log_path=folder / "coglet.log") as cog:
        health = cog.start()
        assert health["status"] == "READY", health
        yield cog


@pytest.fixture(scope="session")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    with serving(tiny_model_dir, tmp_path_factory.mktemp("server")) as cog:
        yield cog


@pytest.fixture(scope="session")
def demo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CogServer]:
    """The real server on the committed demo model (demo/), which draws what its prompts ask."""
    with serving(layout.DEMO_MODEL_DIR, tmp_path_factory.mktemp("demo-server")) as cog:
        yield cog


def becomes_ready(server: CogServer, timeout: float = 5.0) -> bool:
    """True once /health-check says READY. coglet releases its slot just after it answers, so
    right after a prediction (above all a failed one, on a loaded machine) it may still say BUSY
    for a moment; what must never happen is UNHEALTHY or a slot that stays taken."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = server.get("/health-check")["status"]
        if status == "READY":
            return True
        assert status == "BUSY", status
        time.sleep(0.02)
    return False


@pytest.fixture
def webhooks() -> Iterator[Webhooks]:
    hooks = Webhooks()
    yield hooks
    hooks.close()


def predict_ok(server: CogServer, **inputs: Any) -> dict[str, Any]:
    """POST a prediction that must succeed; returns the response body."""
    status, body = server.predict(inputs)
    assert status == 200, body
    assert body["status"] == "succeeded", body.get("error")
    return body


def predict_failed(server: CogServer, **inputs: Any) -> str:
    """POST a prediction that must fail inside the predictor; returns its error message."""
    status, body = server.predict(inputs)
    assert status == 200, body
    assert body["status"] == "failed", body
    return body["error"]


def output_images(body: dict[str, Any]) -> list[tuple[str, bytes]]:
    """(mime type, file bytes) of each output data URI."""
    return [decode_data_uri(uri) for uri in body["output"]]


def open_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def image_data_uri(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"
