"""Parsing LoRA references (`replicate_weights`, `extra_lora`, `COG_WEIGHTS`): pure, no I/O.

A reference becomes a `LoraRef` that says what kind of source it is, what would be fetched
first, how to show it without secrets, a secret-free identity, and the digest of the credentials
the reference itself carries (a token in its query, user:password@): the download cache keys by
both, so a file fetched with a credential never reaches a caller who did not present it.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote

from flux_lora.errors import InputError
from flux_lora.urls import checked_url, redact, split_credentials

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
HF_HOSTS = {"huggingface.co", "www.huggingface.co", "hf.co"}
CIVITAI_HOSTS = {"civitai.com", "www.civitai.com"}
REPLICATE_HOSTS = {"replicate.com", "www.replicate.com"}
REPLICATE_REF = re.compile(r"^(?P<owner>[\w-]+)/(?P<model>[\w.-]+)(?:/(?:versions/)?(?P<version>[\w]+))?/?$")
EXAMPLES = (
    "owner/model[/version], huggingface.co/<owner>/<repo>, civitai.com/models/<id>, "
    "or an https URL ending in .safetensors or .tar"
)


@dataclass(frozen=True)
class Endpoints:
    """Base URLs of the services references point at (tests point them at loopback)."""

    replicate: str = "https://replicate.com"
    huggingface: str = "https://huggingface.co"
    civitai: str = "https://civitai.com"

    @classmethod
    def from_env(cls) -> Endpoints:
        return cls(
            replicate=os.environ.get("FLUX_LORA_REPLICATE_URL", cls.replicate).rstrip("/"),
            huggingface=os.environ.get("HF_ENDPOINT", cls.huggingface).rstrip("/"),
            civitai=os.environ.get("FLUX_LORA_CIVITAI_URL", cls.civitai).rstrip("/"),
        )


@dataclass(frozen=True)
class LoraRef:
    kind: str  # "replicate" | "huggingface" | "civitai" | "url" | "data" | "local"
    url: str  # what is fetched first (may hold secrets: never log it), or the local path
    display: str  # for logs and messages: secrets replaced by ***
    identity: str  # secret-free identity of the weights, for the cache key
    scope: str | None = None  # digest of the credentials in the reference, also in the cache key
    is_tar: bool = False
    repo_id: str | None = None  # Hugging Face
    revision: str | None = None
    filename: str | None = None
    model_id: str | None = None  # CivitAI
    version_id: str | None = None


def parse_lora_ref(
    text: str, input_name: str, endpoints: Endpoints | None = None, *, allow_local: bool = False
) -> LoraRef:
    """Raise InputError, naming `input_name`, for anything that is not a usable reference."""
    endpoints = endpoints or Endpoints.from_env()
    text = text.strip()
    if text.startswith("data:"):
        return _data_ref(text, input_name)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", text)
    if scheme and scheme[1].lower() not in {"http", "https"} and not re.match(r"^[\w-]+/", text):
        raise InputError(
            f"{input_name}: the {scheme[1].lower()}: scheme is not supported. Use an http(s) URL, a data: "
            f"URL, or {EXAMPLES}."
        )
    # A relative path reads like a Replicate "owner/model": for COG_WEIGHTS a file that exists wins.
    if text.startswith(("/", "./", "../", "~")) or (allow_local and not scheme and os.path.isfile(text)):
        if allow_local:
            return LoraRef("local", text, text, f"local:{os.path.abspath(os.path.expanduser(text))}")
        raise InputError(
            f"{input_name}: {redact(text)!r} is a local path; request inputs never read files on the "
            f"server. Use {EXAMPLES}."
        )
    if not scheme:
        host = text.split("/", 1)[0].lower()
        if host in HF_HOSTS | CIVITAI_HOSTS | REPLICATE_HOSTS or "." in host:
            text = "https://" + text
        elif match := REPLICATE_REF.match(text):
            return _replicate_ref(match, endpoints)
        else:
            raise InputError(f"{input_name}: {redact(text)!r} is not a LoRA reference. Use {EXAMPLES}.")

    parts = checked_url(text, f"{input_name}: {redact(text)!r}")
    host = (parts.hostname or "").lower()
    if host in HF_HOSTS:
        return _huggingface_ref(parts, input_name, endpoints)
    if host in CIVITAI_HOSTS:
        return _civitai_ref(parts, input_name, endpoints)
    if host in REPLICATE_HOSTS:
        path = parts.path.strip("/").removesuffix("/_weights")
        if match := REPLICATE_REF.match(path):
            return _replicate_ref(match, endpoints)
        raise InputError(
            f"{input_name}: {redact(text)!r} is not a Replicate model. Use owner/model[/version]."
        )
    return _url_ref(text, parts, input_name)


def describe(ref: LoraRef) -> str:
    """What fetching `ref` would do, secrets redacted: for `python -m flux_lora resolve-lora`."""
    then = {
        "replicate": "a tarball, after redirects; its single .safetensors member is used",
        "huggingface": "the repository's single .safetensors file" if ref.filename is None else "",
        "civitai": "" if ref.version_id else "the newest version's SafeTensor download",
        "url": "its single .safetensors member" if ref.is_tar else "",
    }.get(ref.kind, "")
    lines = [f"kind: {ref.kind}", f"fetch: {ref.display}"]
    if then:
        lines.append(f"then: {then}")
    lines.append(f"identity: {ref.identity}")
    if ref.scope:
        lines.append("cached for: callers who send the same credentials (the reference carries some)")
    return "\n".join(lines)


def _data_ref(text: str, input_name: str) -> LoraRef:
    header = text.split(",", 1)[0]
    if "," not in text or not header.endswith(";base64"):
        raise InputError(
            f"{input_name}: a data: URL must be base64, like data:application/octet-stream;base64,..."
        )
    digest = hashlib.sha256(text.encode()).hexdigest()
    return LoraRef("data", text, f"{header},... ({len(text)} characters)", f"data:{digest}")


def _replicate_ref(match: re.Match[str], endpoints: Endpoints) -> LoraRef:
    owner, model, version = match["owner"], match["model"], match["version"]
    path = f"{owner}/{model}" + (f"/versions/{version}" if version else "")
    url = f"{endpoints.replicate}/{path}/_weights"
    return LoraRef("replicate", url, url, f"replicate:{path}", is_tar=True)


def _huggingface_ref(parts, input_name: str, endpoints: Endpoints) -> LoraRef:
    segments = [unquote(s) for s in parts.path.strip("/").split("/") if s]
    if len(segments) < 2:
        raise InputError(
            f"{input_name}: {redact(parts.geturl())!r} names no repository. Use huggingface.co/<owner>/<repo>."
        )
    repo_id, rest = "/".join(segments[:2]), segments[2:]
    revision = filename = None
    if rest and rest[0] in {"resolve", "blob"} and len(rest) >= 3:
        revision, filename = rest[1], "/".join(rest[2:])
        _check_suffix(filename, parts.geturl(), input_name)
    elif rest and rest[0] == "tree" and len(rest) == 2:
        revision = rest[1]
    elif rest:
        raise InputError(
            f"{input_name}: {redact(parts.geturl())!r} is not a repository or file link. Use "
            "huggingface.co/<owner>/<repo> or huggingface.co/<owner>/<repo>/resolve/<revision>/<file>.safetensors."
        )
    rev = revision or "main"
    if filename:
        url = f"{endpoints.huggingface}/{repo_id}/resolve/{quote(rev, safe='')}/{quote(filename)}"
    else:
        url = f"{endpoints.huggingface}/api/models/{repo_id}/revision/{quote(rev, safe='')}"
    identity = f"hf:{repo_id}@{rev}" + (f"/{filename}" if filename else "")
    return LoraRef("huggingface", url, url, identity, repo_id=repo_id, revision=revision, filename=filename)


def _civitai_ref(parts, input_name: str, endpoints: Endpoints) -> LoraRef:
    query = dict(parse_qsl(parts.query))
    if match := re.fullmatch(r"/models/(\d+)(?:/[^/]*)?/?", parts.path):
        model_id, version_id = match[1], query.get("modelVersionId")
        if version_id and not version_id.isdigit():
            raise InputError(f"{input_name}: modelVersionId={version_id!r} must be a number.")
        if version_id:
            url = f"{endpoints.civitai}/api/download/models/{version_id}?type=Model&format=SafeTensor"
            return LoraRef(
                "civitai", url, url, f"civitai:version:{version_id}", model_id=model_id, version_id=version_id
            )
        url = f"{endpoints.civitai}/api/v1/models/{model_id}"
        return LoraRef("civitai", url, url, f"civitai:model:{model_id}", model_id=model_id)
    if match := re.fullmatch(r"/api/download/models/(\d+)/?", parts.path):
        version_id = match[1]
        url = f"{endpoints.civitai}/api/download/models/{version_id}" + (
            f"?{parts.query}" if parts.query else ""
        )
        scope = split_credentials(url)[1]
        return LoraRef(
            "civitai", url, redact(url), f"civitai:version:{version_id}", scope, version_id=version_id
        )
    raise InputError(
        f"{input_name}: {redact(parts.geturl())!r} is not a CivitAI model link. Use "
        "civitai.com/models/<id>[/<name>][?modelVersionId=<version>]."
    )


def _url_ref(text: str, parts, input_name: str) -> LoraRef:
    path = unquote(parts.path).lower()
    is_tar = path.endswith(".tar")
    if not is_tar:
        _check_suffix(path, text, input_name)
    identity, scope = split_credentials(text)
    return LoraRef("url", text, redact(text), f"url:{identity}", scope, is_tar=is_tar)


def _check_suffix(path: str, text: str, input_name: str) -> None:
    lowered = path.lower()
    if lowered.endswith(PICKLE_SUFFIXES):
        raise InputError(
            f"{input_name}: {redact(text)!r} is a pickle file, which can run code when loaded; only "
            ".safetensors LoRAs are accepted. Look for a .safetensors version of these weights."
        )
    if not lowered.endswith(".safetensors"):
        raise InputError(f"{input_name}: {redact(text)!r} must end in .safetensors or .tar. Use {EXAMPLES}.")
