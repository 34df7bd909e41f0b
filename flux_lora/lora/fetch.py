"""Fetching LoRA weights named by a `LoraRef` into the on-disk cache, verified as safetensors.

Sources: Replicate trainings (a tarball), Hugging Face repos, CivitAI models, plain http(s)
URLs (.safetensors or .tar), data: URLs and, for COG_WEIGHTS only, local files. Every
download goes to a staging file, is verified, then committed to the cache under a per-LoRA
inter-process lock, so concurrent fetches of one LoRA download it once. Messages and logs use
the redacted reference only: tokens never leave the request headers.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from flux_lora.errors import DownloadError, FluxLoraError, InputError
from flux_lora.http import (
    ALLOW_PRIVATE_ENV,
    CHUNK,
    EVERY_NETWORK,
    AddressPolicy,
    SafeHttp,
    allowed_private_networks,
    decode_data_url,
    is_public_address,
    too_large,
)
from flux_lora.interrupt import (
    DEFAULT_DOWNLOAD_LIMIT_S,
    DOWNLOAD_LIMIT_ENV,
    CheckedReader,
    Interrupt,
    seconds_from_env,
)
from flux_lora.lora.cache import LoraCache
from flux_lora.lora.files import TAR_SNIFF_BYTES, extract_safetensors, is_tarball
from flux_lora.lora.refs import LoraRef
from flux_lora.net_errors import endpoint_unresolved, status_message
from flux_lora.tensor_files import verify_safetensors

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 16 * 1024**2
TIMEOUT_ENV = "FLUX_LORA_DOWNLOAD_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class FetchedLora:
    path: Path  # a complete, verified .safetensors file
    from_cache: bool  # True when no network I/O happened
    trigger_word: str | None  # from the Replicate trainer's config.yaml inside a tarball, if present
    display: str  # the redacted reference, for logs


class LoraFetcher:
    def __init__(
        self,
        cache: LoraCache,
        *,
        max_download_bytes: int = 2 * 1024**3,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        limit_s: float = DEFAULT_DOWNLOAD_LIMIT_S,
        allow_private: bool | None = None,
        is_public_address: AddressPolicy = is_public_address,
    ) -> None:
        if allow_private is None:
            allowed_private = allowed_private_networks(os.environ.get(ALLOW_PRIVATE_ENV))
        else:
            allowed_private = EVERY_NETWORK if allow_private else ()
        self.cache = cache
        self.max_bytes = max_download_bytes
        self.timeout_s = timeout_s
        self.http = SafeHttp(
            timeout_s=timeout_s,
            limit_s=limit_s,
            max_bytes=max_download_bytes,
            allowed_private=allowed_private,
            is_public_address=is_public_address,
        )

    @classmethod
    def from_env(cls, cache: LoraCache) -> LoraFetcher:
        """FLUX_LORA_DOWNLOAD_TIMEOUT_S (seconds without data before a download fails, default 30),
        FLUX_LORA_DOWNLOAD_LIMIT_S (seconds for a whole download, default 600) and
        FLUX_LORA_ALLOW_PRIVATE_URLS."""
        return cls(
            cache,
            timeout_s=seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S),
            limit_s=seconds_from_env(DOWNLOAD_LIMIT_ENV, DEFAULT_DOWNLOAD_LIMIT_S),
        )

    def fetch(self, ref: LoraRef, input_name: str, interrupt: Interrupt | None = None) -> FetchedLora:
        """The LoRA `ref` names, from the cache or fetched into it. `interrupt` stops the fetch
        between chunks; what it had written is removed, and nothing reaches the cache."""
        interrupt = interrupt or Interrupt()
        where = f"{input_name}: {ref.display}"
        identity = ref.identity if ref.scope is None else f"{ref.identity}|credentials:{ref.scope}"
        if ref.kind == "local":
            path = Path(ref.url).expanduser()
            if not path.is_file():
                raise DownloadError(f"{input_name}: the LoRA file {path} does not exist")
            if not path.name.lower().endswith(".tar"):
                verify_safetensors(path, where)
                return FetchedLora(path, True, None, ref.display)
            stat = path.stat()  # a changed tarball is a new cache entry
            identity = f"{identity}|{stat.st_size}|{stat.st_mtime_ns}"
        key = self.cache.key_for(identity)
        with self.cache.lock(key):
            entry = self.cache.get(key)
            if entry is not None:
                log.info("LoRA %s: using the cached copy", ref.display)
                return FetchedLora(entry.path, True, entry.meta.get("trigger_word"), ref.display)
            started = time.monotonic()
            with self.cache.staging(key) as staged:
                trigger_word = self._fetch_into(ref, staged, input_name, where, interrupt)
                interrupt.check()
                verify_safetensors(staged, where)
                size = staged.stat().st_size
                meta = {"display": ref.display, "kind": ref.kind, "trigger_word": trigger_word, "bytes": size}
                entry = self.cache.commit(key, staged, meta)
        log.info("LoRA %s: fetched %d bytes in %.1f s", ref.display, size, time.monotonic() - started)
        return FetchedLora(entry.path, ref.kind == "local", trigger_word, ref.display)

    def _fetch_into(
        self, ref: LoraRef, staged: Path, input_name: str, where: str, interrupt: Interrupt
    ) -> str | None:
        """Write the LoRA's .safetensors to `staged`; returns the trigger word when a tarball has one."""
        if ref.kind == "local":
            with Path(ref.url).expanduser().open("rb") as file:
                return extract_safetensors(CheckedReader(file, interrupt), staged, where, self.max_bytes)
        if ref.kind == "data":
            data = decode_data_url(ref.url, where, self.max_bytes)
            if is_tarball(data[:TAR_SNIFF_BYTES]):
                source = CheckedReader(io.BytesIO(data), interrupt)
                return extract_safetensors(source, staged, where, self.max_bytes)
            staged.write_bytes(data)
            return None
        if ref.kind == "huggingface":
            self._fetch_huggingface(ref, staged, input_name, where, interrupt)
            return None
        if ref.kind == "civitai":
            self._fetch_civitai(ref, staged, input_name, where, interrupt)
            return None
        if ref.kind not in ("url", "replicate"):
            raise InputError(f"{where}: unsupported LoRA source {ref.kind!r}")
        headers = _bearer("REPLICATE_API_TOKEN") if ref.kind == "replicate" else {}
        with self.http.get(ref.url, where, headers, interrupt=interrupt) as body:
            if ref.is_tar:
                return extract_safetensors(body, staged, where, self.max_bytes)
            _copy(body, staged)
        return None

    def _fetch_huggingface(
        self, ref: LoraRef, staged: Path, input_name: str, where: str, interrupt: Interrupt
    ) -> None:
        # Imported here: huggingface_hub is slow to import and only this source needs it.
        import httpx2
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo, revision = ref.repo_id or "", ref.revision or "main"
        endpoint = _hf_endpoint(ref)
        token = os.environ.get("HF_TOKEN") or None
        filename = ref.filename
        repo_text = f"{input_name}: the Hugging Face repo {repo}"
        try:
            if filename is None:
                info = HfApi(endpoint=endpoint, token=token).model_info(
                    repo, revision=revision, timeout=self.timeout_s
                )
                filename = _pick_file([s.rfilename for s in info.siblings or []], repo, revision, repo_text)
            url = hf_hub_url(repo, filename, revision=revision, endpoint=endpoint)
            meta = get_hf_file_metadata(url, token=token, timeout=self.timeout_s, endpoint=endpoint)
            if meta.size is not None and meta.size > self.max_bytes:
                raise too_large(where, self.max_bytes)
            # The file itself through our downloader: the address policy, bounds, limits and cancel
            # of every other download (the token goes to the Hub only, never to its CDN).
            file_url = hf_hub_url(repo, filename, revision=meta.commit_hash or revision, endpoint=endpoint)
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            with self.http.get(file_url, where, headers, interrupt=interrupt) as body:
                _copy(body, staged)
        except GatedRepoError as err:
            fix = (
                "the token in HF_TOKEN was refused: check that its account has access"
                if token
                else "set HF_TOKEN to a token of an account that has access"
            )
            raise DownloadError(
                f"{repo_text} is gated or private ({_status(err)}): {fix} (for a gated repo, accept its terms on its page first)"
            ) from err
        except RevisionNotFoundError as err:
            raise DownloadError(f"{repo_text} has no revision {revision!r}: check the link") from err
        except (RepositoryNotFoundError, EntryNotFoundError, HfHubHTTPError) as err:
            status = _status(err)
            if status in (401, 403):
                fix = (
                    "HF_TOKEN was refused or lacks access" if token else "set HF_TOKEN to a token with access"
                )
                message = f"is private, gated or missing ({status}): check the link; if it is private or gated, {fix}"
            elif status == 404 and isinstance(err, EntryNotFoundError):
                message = f"has no file {filename!r} at revision {revision!r} (404): check the link"
            elif status == 404:
                message = "was not found (404): check the link"
            else:
                message = f"could not be downloaded: {status_message(status or 0)}"
            raise DownloadError(f"{repo_text} {message}") from err
        except (httpx2.TransportError, OSError) as err:
            if isinstance(err, FluxLoraError):  # ours, already worded (a limit is a TimeoutError)
                raise
            if (failure := endpoint_unresolved(repo_text, endpoint, err)) is not None:
                raise failure from err
            raise DownloadError(
                f"{repo_text} could not be reached ({type(err).__name__}); try again"
            ) from err

    def _fetch_civitai(
        self, ref: LoraRef, staged: Path, input_name: str, where: str, interrupt: Interrupt
    ) -> None:
        # A token the user put in the link wins over CIVITAI_API_TOKEN: send only one of them.
        url_has_token = re.search(r"(^|&)token=.", urlsplit(ref.url).query) is not None
        headers = {} if url_has_token else _bearer("CIVITAI_API_TOKEN")
        has_token = bool(headers) or url_has_token
        refused = (
            "CivitAI refused the token given (CIVITAI_API_TOKEN or token=): check it is valid and allows this model"
            if has_token
            else "CivitAI requires an API token for this model: set CIVITAI_API_TOKEN to a key from your CivitAI account settings"
        )
        url, version = ref.url, ref.version_id
        if version is None:
            messages = {
                404: f"CivitAI has no model {ref.model_id} (404): check the link",
                401: refused,
                403: refused,
            }
            with self.http.get(
                ref.url, where, headers, messages, limit=MAX_JSON_BYTES, interrupt=interrupt
            ) as body:
                raw = body.read()
            try:
                version = str(int(json.loads(raw)["modelVersions"][0]["id"]))
            except (ValueError, KeyError, IndexError, TypeError):
                raise InputError(
                    f"{where}: CivitAI model {ref.model_id} lists no version to download"
                ) from None
            parts = urlsplit(ref.url)
            url = (
                f"{parts.scheme}://{parts.netloc}/api/download/models/{version}?type=Model&format=SafeTensor"
            )
            where = f"{where} (version {version})"
        messages = {
            404: f"CivitAI has no model version {version} (404): check the link",
            401: refused,
            403: refused,
        }
        with self.http.get(url, where, headers, messages, interrupt=interrupt) as body:
            _copy(body, staged)


def _copy(source: BinaryIO, staged: Path) -> None:
    with staged.open("wb") as out:
        shutil.copyfileobj(source, out, CHUNK)


def _bearer(variable: str) -> dict[str, str]:
    token = os.environ.get(variable, "").strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _pick_file(files: list[str], repo: str, revision: str, repo_text: str) -> str:
    found = sorted(f for f in files if f.lower().endswith(".safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{repo_text} has no .safetensors file at revision {revision!r}")
    raise InputError(
        f"{repo_text} has several .safetensors files ({', '.join(found)}); name one, like "
        f"huggingface.co/{repo}/resolve/{revision}/{found[0]}"
    )


def _hf_endpoint(ref: LoraRef) -> str:
    """The Hub endpoint the parser put in front of the reference (HF_ENDPOINT or the default)."""
    marker = f"/{ref.repo_id}/resolve/" if ref.filename else f"/api/models/{ref.repo_id}/"
    index = ref.url.find(marker)
    parts = urlsplit(ref.url)
    return ref.url[:index] if index > 0 else f"{parts.scheme}://{parts.netloc}"


def _status(err: Exception) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)
