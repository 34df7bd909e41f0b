"""Fetching the `image` and `mask` inputs: http(s) URLs and data: URLs, never server paths.

The predictors declare these inputs as URL strings, not `cog.Path`: cog would download a Path
input itself, before our code runs, with plain `requests` (no address policy, no size bound), so
any request could make the container fetch from its own network. Here an http(s) URL goes through
`SafeHttp`, the downloader every LoRA uses (public addresses only, checked again after each
redirect; bounded size; read timeouts), and a data: URL is decoded with the same size bound.
"""

from __future__ import annotations

import io
import logging
import time

from flux_lora.download import SafeHttp, decode_data_url
from flux_lora.errors import InputError
from flux_lora.lora_refs import redact

log = logging.getLogger(__name__)

# A 1440 px photo is a few MB; 64 MiB admits the largest image we decode (64 MP, see
# images.MAX_INPUT_MEGAPIXELS) as a high-quality JPEG and stops a request from filling memory.
MAX_IMAGE_BYTES = 64 * 1024**2
URL_SCHEMES = ("http://", "https://", "data:")


def is_image_url(value: str) -> bool:
    return value.lower().startswith(URL_SCHEMES)


def describe_image_url(value: str) -> str:
    """The input as it may appear in logs and messages: credentials out, data: URLs shortened."""
    if value.lower().startswith("data:"):
        return f"{value.split(',', 1)[0]},... ({len(value)} characters)"
    return redact(value)


class ImageFetcher:
    def __init__(self, http: SafeHttp, max_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.http = http
        self.max_bytes = max_bytes

    def fetch(self, value: str, name: str) -> io.BytesIO:
        """The bytes of the image `value` names; `name` ("image" or "mask") starts every message."""
        where = f"{name}: {describe_image_url(value)}"
        if not is_image_url(value):  # check_request refuses these first; this keeps the rule local
            raise InputError(f"{where} is not an http(s) or data: URL")
        if value.lower().startswith("data:"):
            return io.BytesIO(decode_data_url(value, where, self.max_bytes))
        started = time.monotonic()
        with self.http.get(value, where, limit=self.max_bytes) as body:
            data = body.read()
        log.info("%s: fetched %d bytes in %.2f s", where, len(data), time.monotonic() - started)
        return io.BytesIO(data)
