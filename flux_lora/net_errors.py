"""What went wrong talking to a server, in words a user can act on: a host name that does not
resolve (retrying will not help), a request that failed or timed out, an HTTP status. Used by the
safe downloader (`http`), the LoRA fetcher and the Hub side of download-weights alike.
"""

from __future__ import annotations

import re
import socket
import ssl
from urllib.parse import urlsplit

from flux_lora.errors import DownloadError


def unresolved(where: str, host: str, err: BaseException) -> DownloadError:
    """A host name with no address: retrying will not help; the name or the network is wrong."""
    reason = name_resolution_failure(err) or type(err).__name__
    return DownloadError(
        f"{where}: the host name {host} cannot be resolved ({reason}). Check the host name, and that "
        "this machine can reach a DNS server (a container without network access cannot download)"
    )


def endpoint_unresolved(where: str, endpoint: str, err: BaseException) -> DownloadError | None:
    """`unresolved` for the host of the URL `endpoint` when `err` is a failed DNS lookup; else None."""
    if name_resolution_failure(err) is None:
        return None
    return unresolved(where, urlsplit(endpoint).hostname or endpoint, err)


RESOLUTION_FAILED = re.compile(
    r"Name or service not known|Temporary failure in name resolution|nodename nor servname provided"
    r"|No address associated with hostname|getaddrinfo failed"
)


def name_resolution_failure(err: BaseException) -> str | None:
    """The resolver's words when `err`, or an error it was raised from, is a failed DNS lookup
    (socket.gaierror; httpx wraps it in its own ConnectError); None for any other error."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, socket.gaierror):
            return seen.strerror or str(seen)
        found = RESOLUTION_FAILED.search(str(seen))
        if found:
            return found[0]
        seen = seen.__cause__ or seen.__context__
    return None


def request_error(err: Exception, where: str, host: str) -> DownloadError:
    if isinstance(err, TimeoutError):
        return DownloadError(f"{where}: {host} did not answer in time (timed out); try again")
    if isinstance(err, ssl.SSLCertVerificationError):
        return DownloadError(f"{where}: the TLS certificate of {host} could not be verified")
    return DownloadError(f"{where}: the request to {host} failed ({type(err).__name__}); try again")


def status_message(status: int) -> str:
    if status == 404:
        return "not found (404): check the URL"
    if status in (401, 403):
        return f"refused ({status}): the URL needs credentials"
    if status >= 500:
        return f"the server failed ({status}); try again later"
    return f"the server answered {status}"
