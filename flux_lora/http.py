"""HTTP(S) GETs of URLs that users name, with the safety rules every LoRA download follows.

Only http and https; at most MAX_REDIRECTS redirects; every hop's host is resolved and the
socket is connected to a checked address (and its peer checked again once connected), so a
redirect or a DNS answer cannot lead to a loopback, private or link-local service unless the
operator allowed it. Authorization never follows a redirect to another origin. Bodies are
bounded in size, reads time out, a whole download has a wall-clock limit, and a body shorter
than its Content-Length is an error. A download stops between chunks when its prediction is
canceled or runs out of time, and a read blocked on a silent server is woken by shutting the
socket down (`Interrupt.on_stop`). Messages show URLs only through `urls.redact`.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager, suppress
from urllib.parse import unquote, urljoin, urlsplit

from flux_lora.errors import ConfigError, DeadlineError, DownloadError, InputError
from flux_lora.interrupt import DEFAULT_DOWNLOAD_LIMIT_S, DOWNLOAD_LIMIT_ENV, Interrupt
from flux_lora.net_errors import request_error, status_message, unresolved
from flux_lora.urls import checked_url

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
AddressPolicy = Callable[[IPAddress], bool]
ALLOW_PRIVATE_ENV = "FLUX_LORA_ALLOW_PRIVATE_URLS"
EVERY_NETWORK: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))
MAX_REDIRECTS = 5
REDIRECT_CODES = {301, 302, 303, 307, 308}
CHUNK = 1 << 20
USER_AGENT = "flux-lora (+https://github.com/replicate/cog)"


def is_public_address(ip: IPAddress) -> bool:
    """The default policy: only globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def allowed_private_networks(raw: str | None) -> tuple[IPNetwork, ...]:
    """FLUX_LORA_ALLOW_PRIVATE_URLS: "1" allows every address, a comma-separated list of
    addresses or networks ("10.1.0.0/16,127.0.0.2") allows those, unset or "0" none."""
    raw = (raw or "").strip()
    if raw in ("", "0"):
        return ()
    if raw == "1":
        return EVERY_NETWORK
    try:
        return tuple(ipaddress.ip_network(item.strip()) for item in raw.split(",") if item.strip())
    except ValueError as err:
        raise ConfigError(
            f"{ALLOW_PRIVATE_ENV}={raw!r}: {err}. Set it to 1 (any address), to comma-separated "
            "addresses or networks like 10.1.0.0/16, or unset it (public addresses only)"
        ) from None


def gb(n: int) -> str:
    return f"{n / 1024**3:.3g} GiB" if n >= 1024**3 else f"{n / 1024**2:.3g} MiB"


def too_large(where: str, limit: int) -> InputError:
    return InputError(f"{where}: the file is larger than the {gb(limit)} limit; send a smaller file")


def decode_data_url(text: str, where: str, limit: int) -> bytes:
    """The bytes of a base64 `data:` URL, refused before decoding when they would pass `limit`."""
    header, comma, payload = text.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise InputError(f"{where}: a data: URL must be base64, like data:image/png;base64,...")
    payload = re.sub(r"\s+", "", payload)
    if len(payload) // 4 * 3 > limit + 2:
        raise too_large(where, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: the data: URL is not valid base64") from None
    if len(data) > limit:
        raise too_large(where, limit)
    return data


class Body:
    """A response body to read(): bounded by `limit`, with read timeouts and truncation as errors."""

    def __init__(
        self, response: http.client.HTTPResponse, where: str, limit: int, interrupt: Interrupt
    ) -> None:
        self.response = response
        self.where = where
        self.limit = limit
        self.interrupt = interrupt
        self.length = response.length  # None: chunked or connection-close framing
        self.received = 0
        if self.length is not None and self.length > limit:
            raise too_large(where, limit)

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(CHUNK), b""))
        # One byte past the limit is enough to know it was passed.
        size = min(size, self.limit - self.received + 1)
        self.interrupt.check()
        try:
            # read1: what has arrived, up to `size`, so a slow sender is checked between its bytes.
            chunk = self.response.read1(size)
        except TimeoutError as err:
            self.interrupt.check()
            raise DownloadError(
                f"{self.where}: the download timed out (no data for a while); try again"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            self.interrupt.check()  # a stop shuts the socket down: report the stop, not the break
            raise DownloadError(
                f"{self.where}: the connection broke after {self.received} bytes ({type(err).__name__}); try again"
            ) from err
        self.interrupt.check()
        self.received += len(chunk)
        if self.received > self.limit:
            raise too_large(self.where, self.limit)
        if not chunk and size and self.length is not None and self.received < self.length:
            # http.client returns b"" here rather than raising IncompleteRead.
            raise DownloadError(
                f"{self.where}: the download was cut off after {self.received} of {self.length} bytes; try again"
            )
        return chunk


class SafeHttp:
    def __init__(
        self,
        *,
        timeout_s: float,
        max_bytes: int,
        allowed_private: tuple[IPNetwork, ...] = (),
        is_public_address: AddressPolicy = is_public_address,
        limit_s: float = DEFAULT_DOWNLOAD_LIMIT_S,
    ) -> None:
        self.timeout_s = timeout_s  # without data
        self.limit_s = limit_s  # from the request to the last byte
        self.max_bytes = max_bytes
        self.allowed_private = allowed_private
        self.is_public_address = is_public_address

    @contextmanager
    def get(
        self,
        url: str,
        where: str,
        headers: dict[str, str] | None = None,
        messages: dict[int, str] | None = None,
        limit: int | None = None,
        interrupt: Interrupt | None = None,
    ) -> Iterator[Body]:
        """GET `url`, following redirects; yields the body of a 2xx answer, raises for any other.

        `where` starts every message ("<input>: <redacted reference>"); `messages` overrides the
        text for given status codes. `interrupt` stops it (a prediction's cancel or limits); the
        download's own wall-clock limit applies either way.
        """
        interrupt = interrupt or Interrupt()
        too_slow = (
            f"{where}: the download took longer than its limit of {self.limit_s:g} s; try a faster host "
            f"(the operator sets the limit with {DOWNLOAD_LIMIT_ENV})"
        )
        sockets: list[socket.socket] = []
        # The limit also holds while nothing polls the interrupt and the server is silent.
        alarm = threading.Timer(self.limit_s, interrupt.poll)
        alarm.daemon = True
        with (
            interrupt.deadline(self.limit_s, lambda: DeadlineError(too_slow)),
            interrupt.on_stop(lambda: _shut_down(sockets)),
            _running(alarm),
        ):
            conn, response = self._open(url, where, dict(headers or {}), sockets, interrupt)
            with closing(conn), response:
                status = response.status
                if not 200 <= status < 300:
                    raise DownloadError(f"{where}: {(messages or {}).get(status) or status_message(status)}")
                yield Body(response, where, self.max_bytes if limit is None else limit, interrupt)

    def _open(
        self,
        url: str,
        where: str,
        headers: dict[str, str],
        sockets: list[socket.socket],
        interrupt: Interrupt,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        for _ in range(MAX_REDIRECTS + 1):
            interrupt.check()
            parts = checked_url(url, where)
            host = parts.hostname
            if parts.scheme not in ("http", "https") or not host:
                raise InputError(
                    f"{where}: only http and https URLs can be downloaded (got {parts.scheme or '?'}:)"
                )
            port = parts.port
            sent = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity", "Connection": "close", **headers}
            if parts.username is not None and not any(k.lower() == "authorization" for k in sent):
                pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
                sent["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
            conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = conn_cls(host, port, timeout=self.timeout_s)
            conn._create_connection = lambda address, timeout=None, source=None, w=where: self._connect(
                address, timeout, w, sockets
            )
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request("GET", target, headers=sent)
                response = conn.getresponse()
            except (InputError, DownloadError):
                conn.close()
                raise
            except (OSError, http.client.HTTPException) as err:
                conn.close()
                interrupt.check()  # stopped while waiting: say so rather than what the socket saw
                raise request_error(err, where, host) from err
            location = response.getheader("Location")
            if response.status not in REDIRECT_CODES or not location:
                return conn, response
            conn.close()  # closes the response too
            next_url = urljoin(url, location)
            if _origin(next_url) != _origin(url):
                # Credentials are for the host they were given for, never for a redirect target.
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            url = next_url if "@" not in urlsplit(next_url).netloc else _strip_userinfo(next_url)
        raise DownloadError(f"{where}: more than {MAX_REDIRECTS} redirects; check the URL")

    def _allowed(self, ip: IPAddress) -> bool:
        return self.is_public_address(ip) or any(ip in network for network in self.allowed_private)

    def _connect(
        self, address: tuple[str, int], timeout: float | None, where: str, sockets: list[socket.socket]
    ) -> socket.socket:
        host, port = address
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as err:
            raise unresolved(where, host, err) from None
        refused: list[IPAddress] = []
        failure: OSError | None = None
        for family, kind, proto, _, sockaddr in infos:
            ip = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
            if not self._allowed(ip):
                refused.append(ip)
                continue
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)  # the checked address itself: no second DNS lookup to race
                peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
            except OSError as err:
                sock.close()
                failure = err
                continue
            if not self._allowed(peer):
                sock.close()
                refused.append(peer)
                continue
            sockets.append(sock)
            return sock
        if failure is not None:
            reason = (
                "timed out"
                if isinstance(failure, TimeoutError)
                else failure.strerror or type(failure).__name__
            )
            raise DownloadError(f"{where}: cannot connect to {host} ({reason}); try again")
        if refused:
            raise InputError(
                f"{where}: refusing to download from {host}: it is a private, loopback or link-local address "
                f"({refused[0]}); URLs must point to public addresses"
            )
        raise DownloadError(f"{where}: the host {host} has no address")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or ""), port or default


def _strip_userinfo(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]).geturl()


def _shut_down(sockets: list[socket.socket]) -> None:
    """Wake a read blocked on any of `sockets`: it returns at once, with no data."""
    for sock in sockets:
        with suppress(OSError):  # already closed
            sock.shutdown(socket.SHUT_RDWR)


@contextmanager
def _running(timer: threading.Timer) -> Iterator[None]:
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
