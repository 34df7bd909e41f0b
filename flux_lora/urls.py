"""What a URL a user sends may be, and what of it may be shown or kept.

Files come only from http(s) and data: URLs. A URL that cannot be parsed (a space or a control
character, a malformed IPv6 host, a port that is not a number) is an InputError naming the input.

The one rule for credentials in URLs: userinfo (user:password@), and every query or fragment
parameter whose name says it is a credential (token, hf_token, private_token, api_key, password,
X-Amz-Signature, ...). `redact` shows them as ***, in every message and log line;
`split_credentials` keeps them out of cache identities and scopes the cache to them instead.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from flux_lora.errors import InputError

URL_SCHEMES = ("http://", "https://", "data:")
# A query or fragment parameter is a credential when its name holds one of these words.
SECRET_PARAM_WORDS = re.compile(
    r"token|secret|passw|pwd|key|sig|credential|auth|session|cookie", re.IGNORECASE
)
# name=value pairs in a query or a fragment, and the userinfo of a URL, in any text.
PARAM_PAIR = re.compile(r"(?P<lead>[?&#;])(?P<name>[^=&#?;\s]+)=(?P<value>[^&#;\s]*)")
USERINFO = re.compile(r"(?P<lead>//)[^/?#@\s]*@")
CONTROL_CHARS = re.compile(r"[\x00-\x20\x7f]")


def is_fetchable_url(value: str) -> bool:
    """An http(s) or data: URL: the only forms a request may name a file in."""
    return value.lower().startswith(URL_SCHEMES)


def is_secret_param(name: str) -> bool:
    return SECRET_PARAM_WORDS.search(unquote(name)) is not None


def redact(text: str) -> str:
    """`text` with every credential in it shown as ***: URL userinfo (user:password@) and the value
    of each credential parameter, in a query or a fragment. Works on any text, URL or not."""
    text = USERINFO.sub(r"\g<lead>***@", text)
    return PARAM_PAIR.sub(
        lambda m: f"{m['lead']}{m['name']}=***" if is_secret_param(m["name"]) else m[0], text
    )


def split_credentials(url: str) -> tuple[str, str | None]:
    """The URL as an identity, credentials left out (host lowercased, no userinfo, no credential
    parameters, no fragment), and a digest of the credentials it carried (None without any): a
    cache keyed by both serves a file only to callers who present the same credentials."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    kept = [(k, v) for k, v in query if not is_secret_param(k)]
    secrets = sorted((k, v) for k, v in query if is_secret_param(k))
    userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    identity = urlunsplit((parts.scheme, netloc, parts.path, urlencode(kept), ""))
    if not secrets and not userinfo:
        return identity, None
    digest = hashlib.sha256(repr((userinfo, secrets)).encode()).hexdigest()[:32]
    return identity, digest


def checked_url(url: str, where: str) -> SplitResult:
    """`urlsplit(url)`, or an InputError naming `where` for a URL that cannot be one: control
    characters or spaces, a malformed IPv6 host, a port that is not a number."""
    if CONTROL_CHARS.search(url):
        raise InputError(
            f"{where}: the URL holds a space or a control character; percent-encode it (a space is %20)"
        )
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as err:
        raise InputError(f"{where}: not a valid URL ({err}); check the host and the port") from None
    return parts
