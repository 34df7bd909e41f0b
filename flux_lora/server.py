"""Running the real Cog server (coglet) on loopback, and talking to it over HTTP.

Used by `scripts/predict`, `scripts/bench` and the tests: the same server `cog predict` and
Replicate run, started without Docker from the repository folder.
"""

from __future__ import annotations

import base64
import json
import mimetypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flux_lora.models import REPO_ROOT

TERMINAL_SETUP = {"READY", "SETUP_FAILED", "UNHEALTHY"}


@dataclass
class CogServer:
    """A coglet process serving `predictor` on a free loopback port."""

    predictor: str = "predict.py:Predictor"
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO_ROOT
    port: int = 0
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> dict[str, Any]:
        """Start the server and wait for setup to end; returns the health-check body."""
        self.port = self.port or free_port()
        env = {**os.environ, **self.env, "PORT": str(self.port), "COG_PREDICT_TYPE_STUB": self.predictor}
        # coglet starts its worker as `python` from PATH: make that this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cog.server.http", "--host", "127.0.0.1"],
            cwd=self.cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the worker is a child: stop() signals the whole group
        )
        return self.wait_for_setup(timeout)

    def wait_for_setup(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"cog server exited with code {self.process.returncode}")
            try:
                health = self.get("/health-check")
                if health.get("status") in TERMINAL_SETUP:
                    return health
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cog server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> CogServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def get(self, path: str) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            return json.load(response)

    def predict(self, inputs: dict[str, Any], timeout: float = 600) -> tuple[int, dict[str, Any]]:
        """POST /predictions and wait for the result; returns (HTTP status, body).

        coglet answers 409 while busy, and now and then between back-to-back requests: one
        retry after a short pause covers the latter.
        """
        for attempt in range(2):
            status, body = self._post("/predictions", {"input": inputs}, timeout)
            if status != 409 or attempt == 1:
                return status, body
            time.sleep(0.2)
        raise AssertionError("unreachable")

    def _post(self, path: str, payload: dict, timeout: float) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as err:
            body = err.read()
            try:
                return err.code, json.loads(body)
            except json.JSONDecodeError:
                return err.code, {"detail": body.decode(errors="replace")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def file_to_data_uri(path: Path) -> str:
    return bytes_to_data_uri(
        path.read_bytes(), mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    )


def bytes_to_data_uri(data: bytes, mime: str = "application/octet-stream") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def decode_data_uri(uri: str) -> tuple[str, bytes]:
    """(mime type, bytes) of a `data:<mime>;base64,...` URI."""
    header, _, payload = uri.partition(",")
    if not header.startswith("data:") or not header.endswith(";base64"):
        raise ValueError(f"not a base64 data URI: {uri[:40]}...")
    return header[5:-7], base64.b64decode(payload)
