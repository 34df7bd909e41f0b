"""Load: a short soak with flat resources, concurrent clients against one server, and a fuzz of
the live /openapi.json with schemathesis.

The soak and the full fuzz take minutes: they are in the slow tier (`./scripts/test --all`).
The long runs are `scripts/soak` and `scripts/fuzz` (`tests/load/soak.py`, `tests/load/fuzz.py`).
"""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path
from typing import Any

import pytest

from flux_lora.dev.cog_server import CogServer
from tests.conftest import predict_ok
from tests.fakes import Webhooks
from tests.load import fuzz, soak

# 1024x1024, 8 steps: about 2 s on this 2-core CPU (idle), long enough to fire the other clients
# while it runs (they start once /health-check says BUSY), short enough for the default suite.
BUSY_INPUTS = {"prompt": "a cat", "num_inference_steps": 8, "seed": 1, "output_format": "png"}
QUICK = {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25", "seed": 2}
SYNC_CLIENTS = 6
BUSY_BODY = {"error": "At capacity - all prediction slots busy", "status": "failed"}


# The short soak.


@pytest.mark.slow
def test_short_soak_stays_flat(tiny_model_dir: Path, tmp_path: Path):
    with soak.soak_server(tmp_path) as s:
        report = s.run(40)
    print(soak.table(report))
    assert report.requests == 40 and len(report.results) == 40
    assert not report.failures, [f"{r.combo.label}: {r.error}" for r in report.failures]
    assert report.flat, report.problems
    assert report.final_health == "READY"


def test_adapter_ledger_infers_counts_from_log_lines():
    ledger = soak.AdapterLedger()
    both = soak.Combo("txt2img", "A+B", "dev", False)
    none = soak.Combo("img2img", "none", "dev", False)
    fast_one = soak.Combo("inpaint", "A", "dev", True)
    assert ledger.update(both, "Using seed: 1\nLoRA swap: 2 loaded, 0 unloaded in 0.01 s\n", True) is None
    assert ledger.update(fast_one, "go_fast: FLUX.1-dev transformer copied to fp8 in 0.1 s\n", True)  # 0 != 1
    assert ledger.update(none, "LoRA swap: 0 loaded, 2 unloaded in 0.01 s\n", True) is None
    assert ledger.fp8_copies == 1
    assert ledger.count == {("dev", False): 0}
    assert ledger.update(both, "LoRA swap: 1 loaded, 0 unloaded in 0.01 s\n", True) == (
        "txt2img/dev/base/A+B: 1 adapter(s) inferred on its transformer, expected 2"
    )


def test_flatness_tolerances():
    start = soak.Snapshot(48, 600 * 2**20, 18, 15, 58 * 2**20, 14, 8, 2, 55150, 6)
    same = soak.Snapshot(**{**start.__dict__, "requests": 348, "worker_rss": 640 * 2**20, "worker_fds": 20})
    assert soak.flatness_problems(start, same) == []
    grown = soak.Snapshot(**{**start.__dict__, "worker_rss": 670 * 2**20, "server_fds": 17, "cache_files": 7})
    problems = soak.flatness_problems(start, grown)
    assert len(problems) == 3
    assert "worker RSS grew 70.0 MB" in problems[0]


# Concurrent clients.


def post(server: CogServer, payload: dict, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST /predictions: (status, body), or (-1, the exception) when the connection failed or
    was dropped, which the concurrency test counts rather than raises."""
    try:
        return server.post("/predictions", payload, timeout=120, headers=headers)
    except (urllib.error.URLError, HTTPException, OSError) as err:
        return -1, err


def wait_for_status(server: CogServer, wanted: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.get("/health-check")["status"] == wanted:
            return
        time.sleep(0.02)
    raise AssertionError(f"health-check never said {wanted} within {timeout} s")


def test_concurrent_clients_get_a_result_or_409_and_async_while_busy_is_refused(
    server: CogServer, webhooks: Webhooks
):
    wait_for_status(server, "READY")
    results: dict[str, tuple[int, Any]] = {}

    def client(name: str, payload: dict, headers: dict[str, str] | None = None) -> None:
        results[name] = post(server, payload, headers)

    def first_client() -> None:
        for _ in range(3):  # coglet's 409 right after the previous test's request: retried
            client("busy", {"input": BUSY_INPUTS})
            if results["busy"][0] != 409:
                return
            time.sleep(0.2)

    busy = threading.Thread(target=first_client)
    busy.start()
    wait_for_status(server, "BUSY")
    # While it runs: several sync clients at once, and one async client with a webhook.
    start = threading.Barrier(SYNC_CLIENTS + 1)

    def at_once(name: str, payload: dict, headers: dict[str, str] | None = None) -> None:
        start.wait()
        client(name, payload, headers)

    async_request = {"id": "async-while-busy", "input": QUICK, "webhook": webhooks.url}
    threads = [
        threading.Thread(target=at_once, args=(f"sync-{i}", {"input": {**QUICK, "seed": i}}))
        for i in range(SYNC_CLIENTS)
    ]
    threads.append(
        threading.Thread(target=at_once, args=("async", async_request, {"Prefer": "respond-async"}))
    )
    for thread in threads:
        thread.start()
    for thread in [*threads, busy]:
        thread.join(timeout=120)
    assert len(results) == SYNC_CLIENTS + 2, results

    dropped = {name: r for name, r in results.items() if r[0] == -1}
    assert not dropped, dropped
    server_errors = {name: r for name, r in results.items() if r[0] >= 500}
    assert not server_errors, server_errors
    for name, (status, body) in results.items():
        assert status in (200, 409), (name, status, body)
        if status == 200:
            assert body["status"] == "succeeded", (name, body)
        else:
            assert body == BUSY_BODY, (name, body)
    statuses = [status for status, _ in results.values()]
    assert statuses.count(200) >= 1 and statuses.count(409) >= 1, statuses
    assert results["busy"][0] == 200  # the prediction that was running is not disturbed
    # coglet has one slot: what arrives while it is taken is refused, not queued, and an async
    # request too is a 409 (not a 202), with no prediction created: its webhook never fires.
    assert results["async"] == (409, BUSY_BODY)
    wait_for_status(server, "READY")
    time.sleep(0.5)
    assert not [hook for hook in webhooks.received if hook.get("id") == "async-while-busy"]
    predict_ok(server, **QUICK)


def test_async_prediction_when_idle_is_accepted(server: CogServer, webhooks: Webhooks):
    """The control for the test above: the same async request on an idle server is a 202."""
    wait_for_status(server, "READY")
    request = {
        "id": "async-when-idle",
        "input": QUICK,
        "webhook": webhooks.url,
        "webhook_events_filter": ["completed"],
    }
    for _ in range(3):  # coglet's occasional 409 between back-to-back requests
        status, body = post(server, request, {"Prefer": "respond-async"})
        if status != 409:
            break
        time.sleep(0.2)
    assert status == 202, body
    assert webhooks.wait_for("async-when-idle", timeout=30)["status"] == "succeeded"
    wait_for_status(server, "READY")


# Fuzzing the live schema.


@pytest.mark.slow
def test_fuzz_schema_smoke(server: CogServer):
    """A few generated examples of every operation on the shared server: no 5xx, health
    READY/BUSY throughout, a plain prediction succeeds afterwards."""
    report = fuzz.fuzz(server.url, prediction_examples=6, other_examples=4, max_time=20, coverage=False)
    print(report.summary())
    # GET / and GET /health-check have no inputs: one example each; cancel has no negative data.
    assert report.total >= 5
    assert not report.findings, "\n".join(map(str, report.findings))


@pytest.mark.slow
def test_fuzz_schema(tiny_model_dir: Path, tmp_path: Path):
    """schemathesis's coverage phase (285 boundary cases) and 100 generated prediction examples
    plus 20 for each other operation, on a server of its own: about a minute here, idle."""
    with fuzz.fuzz_server(tmp_path) as (server, worker):
        report = fuzz.fuzz(
            server.url, prediction_examples=100, other_examples=20, max_time=300, worker=worker
        )
    print(report.summary())
    assert report.examples["POST /predictions positive"] + report.examples["POST /predictions negative"] >= 99
    assert not report.findings, "\n".join(map(str, report.findings))
