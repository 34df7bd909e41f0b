"""Canceling a prediction mid-denoise through the real server: POST /predictions/<id>/cancel."""

from __future__ import annotations

import time

from flux_lora.dev.cog_server import CogServer
from tests.conftest import becomes_ready, output_images, predict_ok
from tests.fakes import Webhooks

SLOW = {"prompt": "a cat", "num_inference_steps": 50, "seed": 1}  # 1024x1024: seconds on this CPU
QUICK = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 3}


def test_cancel_mid_denoise_stops_within_a_step_and_changes_nothing(server: CogServer, webhooks: Webhooks):
    before = output_images(predict_ok(server, **QUICK))
    prediction = {
        "id": "cancel-me",
        "input": SLOW,
        "webhook": webhooks.url,
        "webhook_events_filter": ["completed"],
    }
    assert server.post("/predictions", prediction, headers={"Prefer": "respond-async"})[0] == 202
    time.sleep(1.0)  # well inside the denoising loop
    canceled_at = time.monotonic()
    assert server.post("/predictions/cancel-me/cancel", {})[0] == 200
    result = webhooks.wait_for("cancel-me", timeout=10)
    stopped_in = time.monotonic() - canceled_at
    assert result["status"] == "canceled"
    assert "Canceled" in result["logs"] and "50 step(s)" in result["logs"]
    # A step at 1024x1024 takes about 0.1 s here: "within a step or two" with room for a slow machine.
    assert stopped_in < 2.0, stopped_in
    assert becomes_ready(server)
    assert output_images(predict_ok(server, **QUICK)) == before
