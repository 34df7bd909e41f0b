"""Webhooks are sent by coglet, not by this package, and coglet 0.23 has no address filter for
them: a request may name any URL, private ones included. What coglet does offer is the standard
proxy variables (HTTP_PROXY, HTTPS_PROXY, ALL_PROXY, NO_PROXY), with no exception for loopback,
and WEBHOOK_AUTH_TOKEN (a bearer token it sends). A deployment that takes requests from untrusted
clients routes webhooks through an egress proxy that refuses private addresses; this test shows
coglet obeys one."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flux_lora.dev.cog_server import CogServer
from tests.conftest import NO_SERVICES
from tests.fakes import RefusingProxy, Webhooks


@pytest.mark.slow  # coglet's behaviour, not this package's: checked with the slow tier
def test_with_an_egress_proxy_a_webhook_to_loopback_goes_to_the_proxy_only(
    tiny_model_dir: Path, tmp_path: Path
):
    proxy, hooks = RefusingProxy(), Webhooks()
    env = {
        "FLUX_MODEL_DIR": str(tiny_model_dir),
        "FLUX_LORA_CACHE_DIR": str(tmp_path / "cache"),
        "HTTP_PROXY": proxy.url,
        "HTTPS_PROXY": proxy.url,
        **NO_SERVICES,
    }
    try:
        with CogServer(env=env) as server:
            assert server.start()["status"] == "READY"
            prediction = {
                "id": "hooked",
                "input": {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25"},
                "webhook": hooks.url,
                "webhook_events_filter": ["completed"],
            }
            assert server.post("/predictions", prediction, headers={"Prefer": "respond-async"})[0] == 202
            deadline = time.monotonic() + 30
            while not proxy.asked and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ("POST", hooks.url) in proxy.asked
            time.sleep(0.5)
            assert hooks.received == []  # the loopback receiver was never reached directly
    finally:
        proxy.close()
        hooks.close()
