"""Faults inside the pipeline, injected by tests/faults/sitecustomize.py into the server's worker."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.testing import tiny
from tests.conftest import NO_SERVICES, becomes_ready, output_images, predict_failed, predict_ok
from tests.fakes import Exchange, FakeServer, Webhooks

FAULTS = Path(__file__).parent / "faults"
QUICK = {"num_inference_steps": 2, "megapixels": "0.25", "seed": 4, "output_format": "png"}


GENERATE_LIMIT_S = 3  # QUICK takes a fraction of a second here, SLOW several seconds
SLOW = {"prompt": "a cat", "num_inference_steps": 50, "num_outputs": 4, "seed": 1}  # 4 x 1024x1024: 10 s+


@pytest.fixture(scope="module")
def faulty_server(tiny_model_dir, tmp_path_factory) -> Iterator[CogServer]:
    folder = tmp_path_factory.mktemp("faulty")
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(folder / "cache"),
        "PYTHONPATH": str(FAULTS),
        "FLUX_LORA_ALLOW_PRIVATE_URLS": "1",  # LoRAs from the loopback servers below
        "FLUX_LORA_GENERATE_LIMIT_S": str(GENERATE_LIMIT_S),
        "FAULT_LOAD_STARTED": str(folder / "load-started"),
        **NO_SERVICES,
    }
    with CogServer(env=env) as server:
        assert server.start()["status"] == "READY"
        server.folder = folder
        yield server


def cached_files(server: CogServer) -> list[Path]:
    return [p for p in (server.folder / "cache").rglob("*") if p.is_file() and p.suffix != ".lock"]


def cancel_when(server: CogServer, webhooks: Webhooks, prediction: dict, ready: Callable[[], bool]) -> dict:
    """Start `prediction` async, cancel it once `ready()`; returns its final state and how long
    the cancel took to land (seconds, in "stopped_in")."""
    assert server.post("/predictions", prediction, headers={"Prefer": "respond-async"})[0] == 202
    deadline = time.monotonic() + 30
    while not ready():
        assert time.monotonic() < deadline, "the prediction never reached the phase to cancel"
        time.sleep(0.02)
    canceled_at = time.monotonic()
    assert server.post(f"/predictions/{prediction['id']}/cancel", {})[0] == 200
    result = webhooks.wait_for(prediction["id"], timeout=30)
    return {**result, "stopped_in": time.monotonic() - canceled_at}


def test_cancel_wakes_a_download_from_a_silent_server_and_keeps_nothing(
    faulty_server: CogServer, server: CogServer, webhooks: Webhooks
):
    lora = tiny.random_lora(seed=11)
    with FakeServer() as files:
        files.stall("/silent.safetensors", lora, seconds=60)
        prediction = {
            "id": "cancel-download",
            "input": {"prompt": "a cat", "replicate_weights": f"{files.url}/silent.safetensors", **QUICK},
            "webhook": webhooks.url,
            "webhook_events_filter": ["completed"],
        }
        result = cancel_when(
            faulty_server, webhooks, prediction, lambda: files.sent.get("/silent.safetensors")
        )
    assert result["status"] == "canceled" and result["stopped_in"] < 2.0, result
    assert cached_files(faulty_server) == []
    assert becomes_ready(faulty_server)
    after = output_images(predict_ok(faulty_server, prompt="a cat", **QUICK))
    assert after == output_images(predict_ok(server, prompt="a cat", **QUICK))  # as a fresh container


def test_cancel_during_lora_loading_rolls_the_adapters_back(
    faulty_server: CogServer, server: CogServer, webhooks: Webhooks
):
    """Each FAULT_SLOW LoRA takes a second to load: the cancel lands mid-load, takes effect when
    that load ends, and what was loaded is removed."""
    started = faulty_server.folder / "load-started"
    started.unlink(missing_ok=True)
    with FakeServer() as files:
        files.file("/FAULT_SLOW-a.safetensors", tiny.random_lora(seed=12))
        files.file("/FAULT_SLOW-b.safetensors", tiny.random_lora(seed=13))
        prediction = {
            "id": "cancel-load",
            "input": {
                "prompt": "a cat",
                "replicate_weights": f"{files.url}/FAULT_SLOW-a.safetensors",
                "extra_lora": f"{files.url}/FAULT_SLOW-b.safetensors",
                **QUICK,
            },
            "webhook": webhooks.url,
            "webhook_events_filter": ["completed"],
        }
        result = cancel_when(faulty_server, webhooks, prediction, started.exists)
    assert result["status"] == "canceled" and result["stopped_in"] < 2.5, result
    assert "loaded into" in result["logs"] and " txt2img " not in result["logs"], result["logs"]
    assert becomes_ready(faulty_server)
    after = output_images(predict_ok(faulty_server, prompt="a cat", **QUICK))
    assert after == output_images(predict_ok(server, prompt="a cat", **QUICK))


def test_a_generation_past_its_limit_fails_naming_the_limit(faulty_server: CogServer, server: CogServer):
    started = time.monotonic()
    error = predict_failed(faulty_server, **SLOW)
    assert time.monotonic() - started < GENERATE_LIMIT_S + 3
    assert f"denoising and decoding the images took longer than its limit of {GENERATE_LIMIT_S} s" in error
    assert "FLUX_LORA_GENERATE_LIMIT_S" in error
    assert becomes_ready(faulty_server)
    after = output_images(predict_ok(faulty_server, prompt="a cat", **QUICK))
    assert after == output_images(predict_ok(server, prompt="a cat", **QUICK))


def test_out_of_memory_fails_the_request_with_the_fix_and_the_container_stays_ready(
    faulty_server: CogServer, server: CogServer
):
    error = predict_failed(faulty_server, prompt="a cat FAULT_OOM", num_outputs=4, **QUICK)
    assert "Out of memory generating 4 image(s) of 512x512 on cpu" in error
    assert "fewer outputs (num_outputs) or a smaller size" in error
    assert becomes_ready(faulty_server)
    after = output_images(predict_ok(faulty_server, prompt="a cat", **QUICK))
    assert after == output_images(predict_ok(server, prompt="a cat", **QUICK))  # as a fresh container


@pytest.mark.slow
def test_container_killed_mid_download_leaves_nothing_the_next_one_would_serve(tiny_model_dir, tmp_path):
    """The first server is SIGKILLed while the LoRA is half sent; a second server on the same
    cache folder must download it again, whole, and apply exactly what a clean fetch applies."""
    lora = tiny.random_lora(seed=8)
    half_sent = threading.Event()

    def first_stalls_then_serves(ex: Exchange) -> None:
        if ex.server.count(r"/files/slow\.safetensors") == 1:
            ex.start(200, {"Content-Type": "application/octet-stream"}, len(lora))
            ex.write(lora[: len(lora) // 2])
            half_sent.set()
            ex.server.closing.wait(30)
            ex.handler.close_connection = True
        else:
            ex.send(200, lora, {"Content-Type": "application/octet-stream"})

    cache = tmp_path / "cache"
    with FakeServer() as files:
        files.route(r"/files/slow\.safetensors", first_stalls_then_serves)
        reference = f"{files.url}/files/slow.safetensors"
        env = {
            "FLUX_MODEL_DIR": str(tiny_model_dir),
            "FLUX_LORA_CACHE_DIR": str(cache),
            "FLUX_LORA_ALLOW_PRIVATE_URLS": "1",
            **NO_SERVICES,
        }
        first = CogServer(env=env)
        assert first.start()["status"] == "READY"
        outcome: list[BaseException] = []

        def predict_until_killed() -> None:
            try:
                first.predict({"prompt": "a cat", "replicate_weights": reference})
            except OSError as err:  # the connection dies with the container: what this test wants
                outcome.append(err)

        request = threading.Thread(target=predict_until_killed)
        request.start()
        assert half_sent.wait(30)
        os.killpg(first.process.pid, signal.SIGKILL)  # the whole container, worker included
        first.process.wait()
        request.join(10)
        assert outcome, "the request outlived the container"
        assert not any(cache.rglob("lora.safetensors")), "a partial download entered the cache"

        with CogServer(env=env) as second:
            assert second.start()["status"] == "READY"
            body = predict_ok(second, prompt="a cat", replicate_weights=reference, **QUICK)
            assert body["metrics"]["lora_from_cache"] == 0  # fetched again, not the half file
            again = predict_ok(second, prompt="a cat", replicate_weights=bytes_to_data_uri(lora), **QUICK)
        assert output_images(body) == output_images(again)
    cached = list(cache.rglob("lora.safetensors"))  # the URL's entry and the data: URL's
    assert len(cached) == 2 and all(path.read_bytes() == lora for path in cached)
