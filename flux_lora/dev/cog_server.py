"""Running the real Cog server (coglet), and talking to it over HTTP.

Used by `scripts/predict`, `scripts/serve`, `scripts/bench` and the tests: the same server
`cog predict` and Replicate run, started without Docker from the repository folder.

coglet reads the schema it validates with and serves only from `.cog/openapi_schema.json` in its
working folder, which is the canonical predictor's. Any other predictor of `predict.py` runs in a
temporary working folder whose `.cog/openapi_schema.json` is a link to that predictor's committed
schema (`.cog/schemas/<Class>.json`), with the predictor named by absolute path (cog loads it from
its file) and the repository on `PYTHONPATH`, so `flux_lora` and `weights/` are the repository's.

`python -m flux_lora.dev.cog_server [--predictor file.py:Class] [coglet options]` (`scripts/serve`) runs
it in the foreground on `$PORT` (default 5000).
"""

from __future__ import annotations

import argparse
import base64
import json
import mimetypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from flux_lora.dev import openapi
from flux_lora.models.layout import REPO_ROOT

TERMINAL_SETUP = {"READY", "SETUP_FAILED", "UNHEALTHY"}
SETUP_LOGS_WAIT_S = 2.0
DEFAULT_PREDICTOR = "predict.py:Predictor"


@dataclass
class CogServer:
    """A coglet process serving `predictor` (`file.py:Class`, the file relative to `cwd`)."""

    predictor: str = DEFAULT_PREDICTOR
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO_ROOT
    port: int = 0  # 0: a free loopback port
    host: str = "127.0.0.1"
    args: list[str] = field(default_factory=list)  # more coglet options, e.g. ["--upload-url", URL]
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    workdir: Path | None = None  # a variant's temporary working folder (the canonical one runs in cwd)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> dict[str, Any]:
        """Start the server and wait for setup to end; returns the health-check body."""
        if self.log_path:
            with open(self.log_path, "wb") as log:
                self.launch(stdout=log)
        else:
            self.launch(stdout=subprocess.DEVNULL)
        return self.wait_for_setup(timeout)

    def launch(self, stdout: IO[bytes] | int | None = None) -> None:
        """Start coglet without waiting for setup; its output goes to `stdout` (None: ours)."""
        self.port = self.port or free_port()
        workdir, predictor = self._working_folder()
        env = {**os.environ, **self.env, "PORT": str(self.port), "COG_PREDICT_TYPE_STUB": predictor}
        # coglet starts its worker as `python` from PATH: make that this interpreter.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = f"{self.cwd}{os.pathsep}{env.get('PYTHONPATH', '')}".rstrip(os.pathsep)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cog.server.http", "--host", self.host, *self.args],
                cwd=workdir,
                env=env,
                stdout=stdout,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the worker is a child: stop() signals the whole group
            )
        except BaseException:
            self._remove_workdir()
            raise

    def _working_folder(self) -> tuple[Path, str]:
        """The folder to start coglet in, and the predictor reference to give it there."""
        module_file, _, class_name = self.predictor.partition(":")
        if openapi.schema_path(class_name) == openapi.SCHEMA_PATH:
            return self.cwd, self.predictor
        schema = openapi.schema_file(self.predictor, self.cwd)
        if not schema.is_file():
            raise FileNotFoundError(
                f"{schema} does not exist: generate the schema of {self.predictor} with "
                "`python -m flux_lora openapi`"
            )
        self.workdir = Path(tempfile.mkdtemp(prefix=f"cog-{class_name}-"))
        (self.workdir / openapi.SCHEMA_PATH).parent.mkdir()
        (self.workdir / openapi.SCHEMA_PATH).symlink_to(schema)
        return self.workdir, f"{(self.cwd / module_file).resolve()}:{class_name}"

    def _remove_workdir(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def wait_for_setup(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        settled_by: float | None = None  # a terminal status without logs: give them this long
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"cog server exited with code {self.process.returncode}")
            try:
                health = self.get("/health-check")
                # coglet may say READY a moment before it has recorded setup's result and logs.
                if health.get("status") in TERMINAL_SETUP:
                    settled_by = settled_by or time.monotonic() + SETUP_LOGS_WAIT_S
                    if "logs" in health.get("setup", {}) or time.monotonic() > settled_by:
                        return health
            except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"cog server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait()
        finally:
            self._remove_workdir()

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
            status, body = self.post("/predictions", {"input": inputs}, timeout=timeout)
            if status != 409 or attempt == 1:
                return status, body
            time.sleep(0.2)
        raise AssertionError("unreachable")

    def post(
        self, path: str, payload: dict, *, timeout: float = 600, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, Any]]:
        """POST JSON to the server; returns (HTTP status, body), error statuses included."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json", **(headers or {})},
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


def main(argv: list[str] | None = None) -> int:
    """`scripts/serve`: coglet in the foreground on `$HOST:$PORT` until interrupted."""
    parser = argparse.ArgumentParser(
        prog="scripts/serve", description="The Cog server in the foreground; other options go to coglet."
    )
    parser.add_argument(
        "--predictor",
        default=os.environ.get("COG_PREDICT_TYPE_STUB") or DEFAULT_PREDICTOR,
        help="file.py:Class (default: $COG_PREDICT_TYPE_STUB, else %(default)s)",
    )
    options, coglet_args = parser.parse_known_args(argv)
    server = CogServer(
        predictor=options.predictor,
        port=int(os.environ.get("PORT") or 5000),
        host=os.environ.get("HOST") or "127.0.0.1",
        args=coglet_args,
    )
    # coglet runs in its own process group: on Ctrl-C, SIGTERM or a closed terminal, stop it and
    # remove its working folder before exiting.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda signum, frame: sys.exit(128 + signum))
    try:
        server.launch()
        schema = openapi.schema_file(options.predictor, server.cwd)
        print(
            f"Serving {options.predictor} ({schema}) on {server.host}:{server.port}",
            file=sys.stderr,
            flush=True,
        )
        return server.process.wait()
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
