"""Faults inside the pipeline, injected by tests/faults/sitecustomize.py into the server's worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flux_lora.server import CogServer
from tests.conftest import NO_SERVICES, output_images, predict_failed, predict_ok

FAULTS = Path(__file__).parent / "faults"
QUICK = {"num_inference_steps": 2, "megapixels": "0.25", "seed": 4, "output_format": "png"}


@pytest.fixture(scope="module")
def faulty_server(tiny_model_dir, tmp_path_factory) -> Iterator[CogServer]:
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        "PYTHONPATH": str(FAULTS),
        **NO_SERVICES,
    }
    with CogServer(env=env) as server:
        assert server.start()["status"] == "READY"
        yield server


def test_out_of_memory_fails_the_request_with_the_fix_and_the_container_stays_ready(
    faulty_server: CogServer, server: CogServer
):
    error = predict_failed(faulty_server, prompt="a cat FAULT_OOM", num_outputs=4, **QUICK)
    assert "Out of memory generating 4 image(s) of 512x512 on cpu" in error
    assert "fewer outputs (num_outputs) or a smaller size" in error
    assert faulty_server.get("/health-check")["status"] == "READY"
    after = output_images(predict_ok(faulty_server, prompt="a cat", **QUICK))
    assert after == output_images(predict_ok(server, prompt="a cat", **QUICK))  # as a fresh container
