"""Loopback HTTP servers speaking just enough of the real protocols to test LoRA downloads.

`FakeServer` is a `ThreadingHTTPServer` on 127.0.0.x, port 0, in a background thread. Routes are
regular expressions over the path; each request is recorded (method, path, query, headers) so
tests can count requests and see what was sent. Canned routes cover plain files, error statuses,
redirects, truncated, oversize and stalling bodies; `add_replicate`, `HubRepo` + `add_hub` and
`add_civitai` emulate the parts of Replicate, the Hugging Face Hub and CivitAI a fetch touches.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

import torch
from safetensors.torch import save

LORA_MEMBER = "output/flux_train_replicate/lora.safetensors"
CONFIG_MEMBER = "output/flux_train_replicate/config.yaml"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased


class Exchange:
    """One request, handed to a route handler, with helpers to answer it."""

    def __init__(self, handler: BaseHTTPRequestHandler, seen: Seen, match: re.Match[str], server: FakeServer):
        self.handler, self.seen, self.match, self.server = handler, seen, match, server

    @property
    def headers(self) -> dict[str, str]:
        return self.seen.headers

    def bearer(self) -> str | None:
        value = self.headers.get("authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None

    def start(self, status: int, headers: dict[str, str] | None = None, length: int | None = None) -> None:
        self.handler.send_response(status)
        for name, value in (headers or {}).items():
            self.handler.send_header(name, value)
        if length is not None:
            self.handler.send_header("Content-Length", str(length))
        else:
            self.handler.send_header("Connection", "close")
            self.handler.close_connection = True
        self.handler.end_headers()

    def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.start(status, headers, len(body))
        if self.seen.method != "HEAD":
            self.write(body)

    def json(self, obj: object, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def redirect(self, location: str, status: int = 302, headers: dict[str, str] | None = None) -> None:
        self.send(status, b"", {"Location": location, **(headers or {})})

    def write(self, data: bytes) -> None:
        self.handler.wfile.write(data)
        self.handler.wfile.flush()
        self.server.sent[self.seen.path] = self.server.sent.get(self.seen.path, 0) + len(data)


Handler = Callable[[Exchange], None]


class FakeServer:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.routes: list[tuple[re.Pattern[str], Handler]] = []
        self.seen: list[Seen] = []
        self.sent: dict[str, int] = {}  # body bytes written per path
        self.closing = threading.Event()
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    def __enter__(self) -> FakeServer:
        fake = self

        class RequestHandler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._dispatch(self, "GET")

            def do_HEAD(self) -> None:
                fake._dispatch(self, "HEAD")

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients hanging up on oversize or stalled bodies are expected here

        self._httpd = Server((self.host, 0), RequestHandler)
        threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()  # wakes stalling handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "use the server as a context manager"
        return f"http://{self.host}:{self._httpd.server_address[1]}"

    # Recording.

    def requests(self, pattern: str = ".*") -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if re.fullmatch(pattern, s.path)]

    def count(self, pattern: str = ".*") -> int:
        return len(self.requests(pattern))

    # Routes.

    def route(self, pattern: str, handler: Handler) -> None:
        """`pattern` must match the whole path (query excluded); later routes win."""
        self.routes.insert(0, (re.compile(pattern), handler))

    def file(
        self, path: str, data: bytes, *, headers: dict[str, str] | None = None, delay: float = 0.0
    ) -> None:
        def handle(ex: Exchange) -> None:
            if delay:
                self.closing.wait(delay)
            ex.send(200, data, {"Content-Type": "application/octet-stream", **(headers or {})})

        self.route(re.escape(path), handle)

    def status(self, path: str, status: int, body: bytes = b"error") -> None:
        self.route(re.escape(path), lambda ex: ex.send(status, body, {"Content-Type": "text/plain"}))

    def redirect(self, path: str, location: str, status: int = 302) -> None:
        self.route(re.escape(path), lambda ex: ex.redirect(location, status))

    def truncated(self, path: str, data: bytes, claimed: int) -> None:
        """Announces `claimed` bytes, sends `data` (fewer), then closes the connection."""

        def handle(ex: Exchange) -> None:
            ex.start(200, {"Content-Type": "application/octet-stream"}, claimed)
            ex.write(data)
            ex.handler.close_connection = True

        self.route(re.escape(path), handle)

    def endless(self, path: str, total: int, *, announce: int | None = None) -> None:
        """Streams `total` zero bytes; with `announce`, a Content-Length of that many, else close framing."""

        def handle(ex: Exchange) -> None:
            ex.start(200, {"Content-Type": "application/octet-stream"}, announce)
            chunk = bytes(64 * 1024)
            left = total
            while left > 0 and not self.closing.is_set():
                ex.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
            ex.handler.close_connection = True

        self.route(re.escape(path), handle)

    def stall(self, path: str, data: bytes, *, seconds: float = 30.0, length: int | None = None) -> None:
        """Sends the headers (Content-Length: `length`, default len(data)) and the first bytes of
        `data`, then goes silent until `seconds` pass or the server closes."""

        def handle(ex: Exchange) -> None:
            ex.start(
                200, {"Content-Type": "application/octet-stream"}, len(data) if length is None else length
            )
            ex.write(data[:16])
            self.closing.wait(seconds)
            ex.handler.close_connection = True

        self.route(re.escape(path), handle)

    def drip(self, path: str, data: bytes, *, every_s: float) -> None:
        """Sends `data` one byte every `every_s` seconds: never silent for long, never done soon."""

        def handle(ex: Exchange) -> None:
            ex.start(200, {"Content-Type": "application/octet-stream"}, len(data))
            for byte in data:
                if self.closing.wait(every_s):
                    break
                ex.write(bytes([byte]))
            ex.handler.close_connection = True

        self.route(re.escape(path), handle)

    # Dispatch.

    def _dispatch(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        parts = urlsplit(handler.path)
        seen = Seen(
            method=method,
            path=unquote(parts.path),
            query=dict(parse_qsl(parts.query, keep_blank_values=True)),
            headers={k.lower(): v for k, v in handler.headers.items()},
        )
        with self._lock:
            self.seen.append(seen)
            routes = list(self.routes)
        for pattern, route in routes:
            # Match the raw (still quoted) path, so a quoted "/" in a revision stays one segment.
            if match := pattern.fullmatch(parts.path):
                route(Exchange(handler, seen, match, self))
                return
        Exchange(handler, seen, re.match("", ""), self).send(
            404, b"no such route", {"Content-Type": "text/plain"}
        )


# Payloads.


def make_safetensors(tensors: dict[str, torch.Tensor] | None = None) -> bytes:
    if tensors is None:
        tensors = {
            "transformer.a.lora_A.weight": torch.arange(32, dtype=torch.float32).reshape(4, 8),
            "transformer.a.lora_B.weight": torch.ones(8, 4, dtype=torch.bfloat16),
        }
    return save(tensors)


def make_tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.mtime = int(time.time())
    return info, data


def trainer_config(trigger_word: str | None) -> bytes:
    word = f"trigger_word: {trigger_word}\n" if trigger_word is not None else ""
    return (
        "job: custom_job\nconfig:\n  name: flux_train_replicate\n  process:\n  - type: custom_sd_trainer\n"
        f"    training_folder: output\n    {word}    network:\n      type: lora\n      linear: 16\n"
    ).encode()


def make_replicate_tar(safetensors_bytes: bytes, trigger_word: str | None = "TOK") -> bytes:
    """The layout of Replicate's FLUX LoRA trainer output."""
    return make_tar(
        [
            regular(CONFIG_MEMBER, trainer_config(trigger_word)),
            regular(LORA_MEMBER, safetensors_bytes),
            regular("output/flux_train_replicate/README.md", b"# trained LoRA\n"),
        ]
    )


def hostile_tar(kind: str, safetensors_bytes: bytes) -> tuple[bytes, str]:
    """A tarball broken in one way, and the member name a refusal should mention."""
    if kind == "dotdot":
        name = "output/../../escape.safetensors"
        return make_tar([regular(name, safetensors_bytes)]), name
    if kind == "absolute":
        name = "/tmp/abs.safetensors"
        return make_tar([regular(name, safetensors_bytes)]), name
    if kind in ("symlink", "hardlink"):
        name = "output/lora.safetensors"
        info = tarfile.TarInfo(name)
        info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
        info.linkname = "/etc/passwd"
        return make_tar([(info, None)]), name
    if kind == "fifo":
        name = "output/lora.safetensors"
        info = tarfile.TarInfo(name)
        info.type = tarfile.FIFOTYPE
        return make_tar([(info, None)]), name
    if kind == "two":
        names = ["output/a.safetensors", "output/b.safetensors"]
        return make_tar([regular(n, safetensors_bytes) for n in names]), names[1]
    if kind == "none":
        return make_tar([regular("output/weights.txt", b"not here")]), "output/weights.txt"
    raise ValueError(kind)


# Replicate.


def add_replicate(
    server: FakeServer, storage: FakeServer, owner_model: str, tar_bytes: bytes, *, token: str | None = None
) -> None:
    """`/<owner>/<model>[/versions/<v>]/_weights` checks the bearer token (when set) and 302s to `storage`."""
    blob = f"/replicate-storage/{hashlib.sha256(tar_bytes).hexdigest()[:16]}/trained_model.tar"
    storage.file(blob, tar_bytes, headers={"Content-Type": "application/x-tar"})

    def handle(ex: Exchange) -> None:
        if token is not None and ex.bearer() != token:
            ex.json({"detail": "Authentication credentials were not provided."}, 401)
            return
        ex.redirect(f"{storage.url}{blob}?X-Amz-Signature=storagesig")

    server.route(re.escape(f"/{owner_model}") + r"(/versions/\w+)?/_weights", handle)


# Hugging Face Hub.


@dataclass
class HubRepo:
    repo_id: str
    files: dict[str, bytes]
    token: str | None = None  # gated: files need `Authorization: Bearer <token>`
    sha: str = field(default_factory=lambda: hashlib.sha1(str(time.time_ns()).encode()).hexdigest())
    revisions: tuple[str, ...] = ("main",)
    lfs_cdn: FakeServer | None = None  # LFS files: resolve 302s to this other host, like HF's CDN


def add_hub(server: FakeServer, repos: list[HubRepo]) -> None:
    """The Hub's model-info API and /resolve/ (HEAD and GET), as huggingface_hub 2.x calls them.

    Errors carry the X-Error-Code header huggingface_hub maps to its exception classes.
    """
    by_id = {repo.repo_id: repo for repo in repos}
    for repo in repos:
        for data in repo.files.values() if repo.lfs_cdn else ():
            sha256 = hashlib.sha256(data).hexdigest()
            repo.lfs_cdn.file(f"/cdn-lfs/{sha256}", data, headers={"ETag": f'"{sha256}"'})

    def repo_or_error(ex: Exchange, repo_id: str, revision: str) -> HubRepo | None:
        repo = by_id.get(repo_id)
        if repo is None:
            ex.json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
        elif revision not in repo.revisions and revision != repo.sha:
            ex.json({"error": f"Invalid rev id: {revision}"}, 404, {"X-Error-Code": "RevisionNotFound"})
        else:
            return repo
        return None

    def model_info(ex: Exchange) -> None:
        repo_id, revision = unquote(ex.match["repo"]), unquote(ex.match["rev"] or "main")
        if repo := repo_or_error(ex, repo_id, revision):
            ex.json(
                {
                    "_id": "0" * 24,
                    "id": repo.repo_id,
                    "sha": repo.sha,
                    "private": False,
                    "gated": "manual" if repo.token else False,
                    "tags": ["lora"],
                    "siblings": [{"rfilename": name} for name in ["README.md", *repo.files]],
                }
            )

    def resolve(ex: Exchange) -> None:
        repo_id, revision, name = (
            unquote(ex.match["repo"]),
            unquote(ex.match["rev"]),
            unquote(ex.match["file"]),
        )
        repo = repo_or_error(ex, repo_id, revision)
        if repo is None:
            return
        commit = {"X-Repo-Commit": repo.sha}
        if repo.token is not None and ex.bearer() != repo.token:
            status = 403 if ex.bearer() else 401
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            )
            ex.json(
                {"error": message},
                status,
                {"X-Error-Code": "GatedRepo", "X-Error-Message": message, **commit},
            )
            return
        if name not in repo.files:
            ex.json({"error": "Entry not found"}, 404, {"X-Error-Code": "EntryNotFound", **commit})
            return
        data = repo.files[name]
        sha256 = hashlib.sha256(data).hexdigest()
        if repo.lfs_cdn is not None:
            blob = f"/cdn-lfs/{sha256}"
            linked = {"X-Linked-Size": str(len(data)), "X-Linked-Etag": f'"{sha256}"', "ETag": '"pointer"'}
            ex.redirect(f"{repo.lfs_cdn.url}{blob}?Expires=1&Signature=cdnsig", 302, {**commit, **linked})
            return
        ex.send(200, data, {"ETag": f'"{sha256}"', "Content-Type": "application/octet-stream", **commit})

    server.route(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", model_info)
    server.route(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", resolve)


# CivitAI.


@dataclass
class CivitaiVersion:
    id: int
    data: bytes
    token: str | None = None  # when set, downloads need it (Bearer header or ?token=)


def add_civitai(server: FakeServer, storage: FakeServer, models: dict[int, list[CivitaiVersion]]) -> None:
    """`/api/v1/models/<id>` (versions newest first) and `/api/download/models/<version>`, which 302s
    to a signed URL on `storage`, as CivitAI's downloads do."""
    versions = {v.id: v for vs in models.values() for v in vs}
    for version in versions.values():
        storage.file(f"/civitai-storage/{version.id}/lora.safetensors", version.data)

    def model(ex: Exchange) -> None:
        model_id = int(ex.match[1])
        if model_id not in models:
            ex.json({"error": f"No model with id {model_id}"}, 404)
            return
        ex.json(
            {
                "id": model_id,
                "name": f"model {model_id}",
                "type": "LORA",
                "modelVersions": [
                    {"id": v.id, "name": f"v{v.id}", "baseModel": "Flux.1 D", "trainedWords": ["TOK"]}
                    for v in models[model_id]
                ],
            }
        )

    def download(ex: Exchange) -> None:
        version = versions.get(int(ex.match[1]))
        if version is None:
            ex.json({"error": "Model not found"}, 404)
            return
        given = ex.bearer() or ex.seen.query.get("token")
        if version.token is not None and given != version.token:
            ex.json(
                {
                    "error": "Unauthorized",
                    "message": "The creator of this asset requires you to be logged in",
                },
                401,
            )
            return
        ex.redirect(f"{storage.url}/civitai-storage/{version.id}/lora.safetensors?X-Amz-Signature=civsig")

    server.route(r"/api/v1/models/(\d+)", model)
    server.route(r"/api/download/models/(\d+)", download)


def add_hub_files_metadata(server: FakeServer, repos: list[HubRepo]) -> None:
    """Model info as `HfApi.model_info(files_metadata=True)` gets it (`?blobs=true`): each sibling
    with its size, and LFS details for weights. Call after `add_hub` (later routes win); without
    `blobs` the answer is add_hub's, and the listing stays one request, like the Hub's."""
    by_id = {repo.repo_id: repo for repo in repos}

    def model_info(ex: Exchange) -> None:
        repo_id, revision = unquote(ex.match["repo"]), unquote(ex.match["rev"] or "main")
        repo = by_id.get(repo_id)
        if repo is None:
            ex.json({"error": "Repository not found"}, 404, {"X-Error-Code": "RepoNotFound"})
            return
        if revision not in repo.revisions and revision != repo.sha:
            ex.json({"error": f"Invalid rev id: {revision}"}, 404, {"X-Error-Code": "RevisionNotFound"})
            return
        files = {"README.md": b"# model card\n", **repo.files}
        blobs = ex.seen.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for name, data in files.items():
            sibling: dict[str, object] = {"rfilename": name}
            if blobs:
                sibling.update(size=len(data), blobId=hashlib.sha1(data).hexdigest())
                if name.endswith((".safetensors", ".bin", ".pt")):
                    sha256 = hashlib.sha256(data).hexdigest()
                    sibling["lfs"] = {"size": len(data), "sha256": sha256, "pointerSize": 134}
            siblings.append(sibling)
        ex.json(
            {
                "_id": "0" * 24,
                "id": repo.repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.token else False,
                "tags": ["diffusers"],
                "siblings": siblings,
            }
        )

    server.route(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", model_info)


# Webhooks.


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

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class RefusingProxy:
    """An egress proxy that refuses everything (403) and records what it was asked: what a
    deployment puts in front of coglet so webhooks cannot reach private addresses."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []
        asked = self.asked

        class Handler(BaseHTTPRequestHandler):
            def refuse(self) -> None:
                asked.append((self.command, self.path))
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = do_CONNECT = refuse

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def unresolvable(monkeypatch, host: str) -> None:
    """Makes `host` a name with no DNS answer, as on a machine without network access: the
    resolver raises what glibc's does; every other name resolves as before."""
    real = socket.getaddrinfo

    def resolve(name, *args, **kwargs):
        if name == host:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
