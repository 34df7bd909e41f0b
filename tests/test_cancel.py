"""Canceling a prediction mid-denoise through the real server: POST /predictions/<id>/cancel."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flux_lora.server import CogServer
from tests.conftest import becomes_ready, output_images, predict_ok

SLOW = {"prompt": "a cat", "num_inference_steps": 50, "seed": 1}  # 1024x1024: seconds on this CPU
QUICK = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 3}


class Webhooks:
    """A loopback receiver for coglet's webhooks (async predictions report their end there)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"

    def wait_for(self, prediction_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.received:
                if body.get("id") == prediction_id:
                    return body
            time.sleep(0.02)
        raise AssertionError(f"no webhook for {prediction_id} within {timeout} s")


@pytest.fixture(scope="module")
def webhooks() -> Iterator[Webhooks]:
    hooks = Webhooks()
    yield hooks
    hooks.httpd.shutdown()


def post(url: str, payload: dict, headers: dict | None = None) -> int:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status


def test_cancel_mid_denoise_stops_within_a_step_and_changes_nothing(server: CogServer, webhooks: Webhooks):
    before = output_images(predict_ok(server, **QUICK))
    prediction = {
        "id": "cancel-me",
        "input": SLOW,
        "webhook": webhooks.url,
        "webhook_events_filter": ["completed"],
    }
    assert post(f"{server.url}/predictions", prediction, {"Prefer": "respond-async"}) == 202
    time.sleep(1.0)  # well inside the denoising loop
    canceled_at = time.monotonic()
    assert post(f"{server.url}/predictions/cancel-me/cancel", {}) == 200
    result = webhooks.wait_for("cancel-me", timeout=10)
    stopped_in = time.monotonic() - canceled_at
    assert result["status"] == "canceled"
    assert "Canceled" in result["logs"] and "50 step(s)" in result["logs"]
    # A step at 1024x1024 takes about 0.1 s here: "within a step or two" with room for a slow machine.
    assert stopped_in < 2.0, stopped_in
    assert becomes_ready(server)
    assert output_images(predict_ok(server, **QUICK)) == before
