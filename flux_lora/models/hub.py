"""Talking to the Hugging Face Hub for `models.download`: one listing of a repo (its commit, the
files the pipeline loads with their sizes and content ids), the access check of a gated repo, one
file's download, and the precise error for each way these fail. Tokens never reach a message.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flux_lora.errors import DownloadError
from flux_lora.models.files import MODEL_REPOS, select_files
from flux_lora.models.layout import RELEASES
from flux_lora.net_errors import endpoint_unresolved

TIMEOUT_S = 60.0

GATED = (
    "{folder} ({repo}) is gated and no HF_TOKEN is set. Accept its licence on its Hugging Face page, "
    "{page}, then set HF_TOKEN to a read token of that account ({endpoint}/settings/tokens) and run again."
)
REFUSED = (
    "{folder} ({repo}) refused: the token's account has not accepted the {folder} licence, or the token "
    "is invalid (HTTP {status}). Accept the licence on {page} with the account HF_TOKEN belongs to, or "
    "check the token at {endpoint}/settings/tokens."
)


@dataclass(frozen=True)
class RepoPlan:
    folder: str
    repo_id: str
    revision: str  # the commit every file is fetched at
    files: dict[str, int | None]  # the selection: path -> size when the Hub reports it
    ids: dict[str, str]  # path -> content id ("sha256:..." for LFS, else "blob:<git oid>"), when listed
    skipped: list[str]
    gated: bool

    @property
    def size(self) -> int | None:
        return total_size(self.files.values())


def total_size(sizes: Iterable[int | None]) -> int | None:
    """The sum of `sizes`, or None when any is unknown."""
    sizes = list(sizes)
    return None if None in sizes else sum(sizes)


def endpoint_url(endpoint: str | None) -> str:
    if endpoint is None:
        from huggingface_hub import constants

        endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    return endpoint.rstrip("/")


def list_repo(folder: str, token: str | None, endpoint: str) -> RepoPlan:
    """One listing call: the commit, every file with its size, whether the repo is gated."""
    import httpx2
    from huggingface_hub import HfApi

    repo = MODEL_REPOS[folder]
    try:
        info = HfApi(endpoint=endpoint, token=token or False).model_info(
            repo, files_metadata=True, timeout=TIMEOUT_S
        )
    except (httpx2.HTTPError, OSError) as err:
        raise hub_error(err, folder, token, endpoint, gated=folder == RELEASES["dev"]) from err
    if not info.sha:
        raise DownloadError(f"{folder}: {endpoint} gave no commit for {repo}; check HF_ENDPOINT")
    siblings = {s.rfilename: s for s in info.siblings or []}
    chosen = select_files(folder, siblings)
    ids = {name: content_id for name in chosen if (content_id := _content_id(siblings[name]))}
    skipped = sorted(set(siblings) - set(chosen))
    files = {name: siblings[name].size for name in chosen}
    return RepoPlan(folder, repo, info.sha, files, ids, skipped, bool(info.gated))


def _content_id(sibling) -> str | None:
    """What the Hub says identifies a file's bytes: its LFS SHA-256, else its git blob id."""
    if sibling.lfs is not None:
        return f"sha256:{sibling.lfs.sha256}"
    return f"blob:{sibling.blob_id}" if sibling.blob_id else None


def check_access(plan: RepoPlan, token: str | None, endpoint: str) -> None:
    """For a gated repo: no token, or a token it refuses (one HEAD), fails before any download."""
    import httpx2
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if not plan.gated:
        return
    if token is None:
        raise hub_error(None, plan.folder, token, endpoint, gated=True)
    url = hf_hub_url(plan.repo_id, next(iter(plan.files)), revision=plan.revision, endpoint=endpoint)
    try:
        get_hf_file_metadata(url, token=token, timeout=TIMEOUT_S, endpoint=endpoint)
    except (httpx2.HTTPError, OSError) as err:
        raise hub_error(err, plan.folder, token, endpoint, gated=True) from err


def fetch_file(
    plan: RepoPlan, name: str, staging: Path, token: str | None, endpoint: str, tqdm_class: type
) -> Path:
    """One file of `plan` into `staging` (huggingface_hub's local-dir download, resumed where a
    complete or partial copy is there), reporting its bytes to `tqdm_class`."""
    import httpx2
    from huggingface_hub import hf_hub_download

    try:
        return Path(
            hf_hub_download(
                plan.repo_id,
                name,
                revision=plan.revision,
                local_dir=staging,
                endpoint=endpoint,
                token=token or False,
                etag_timeout=TIMEOUT_S,
                tqdm_class=tqdm_class,
            )
        )
    except (httpx2.HTTPError, OSError) as err:
        raise hub_error(err, plan.folder, token, endpoint, gated=plan.gated, file=name) from err


def progress_class(bar, lock: threading.Lock, counted: list[int]) -> type:
    """A stand-in for tqdm that huggingface_hub's HTTP and Xet downloads report to: it adds each
    file's bytes to the folder's one bar (as snapshot_download's aggregated bar does)."""

    class FileProgress:
        def __init__(self, *args: object, **kwargs: object) -> None:
            self.update(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> None:
            with lock:
                counted[0] += int(n or 0)
                if bar is not None:
                    bar.update(int(n or 0))

        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_postfix_str(self, *args: object, **kwargs: object) -> None:
            pass

        set_transfer_postfix_str = set_description = set_postfix_str

        def close(self) -> None:
            pass

        def __enter__(self) -> FileProgress:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    return FileProgress


def hub_error(
    err: Exception | None,
    folder: str,
    token: str | None,
    endpoint: str,
    *,
    gated: bool,
    file: str | None = None,
) -> DownloadError:
    """The precise DownloadError for a failure talking to the Hub; never quotes the token."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(err, DownloadError):
        return err
    repo = MODEL_REPOS[folder]
    where = f"{folder} ({repo})"
    status = getattr(getattr(err, "response", None), "status_code", None)
    fields = dict(folder=folder, repo=repo, page=f"{endpoint}/{repo}", endpoint=endpoint, status=status)
    if err is None or status in (401, 403) or isinstance(err, GatedRepoError):
        if gated or isinstance(err, GatedRepoError):
            message = (REFUSED if token else GATED).format(**fields)
        elif token:
            message = f"{where}: the Hub refused HF_TOKEN (HTTP {status}): the token is invalid or expired; fix it, or unset it"
        else:
            message = f"{where} asks for a token (HTTP {status}): set HF_TOKEN to a token with access to it"
    elif isinstance(err, (RevisionNotFoundError, EntryNotFoundError)):
        message = f"{where} changed while downloading ({file or 'listing'}: HTTP {status}); run again"
    elif isinstance(err, RepositoryNotFoundError):
        message = f"{where} was not found on {endpoint} (HTTP {status}); check HF_ENDPOINT"
    elif isinstance(err, HfHubHTTPError):
        message = f"{where}: {endpoint} answered HTTP {status}; run again later (complete files are kept)"
    elif (failure := endpoint_unresolved(where, endpoint, err)) is not None:
        message = str(failure)
    else:
        what = f"{file} " if file else ""
        message = (
            f"{where}: {what}could not be downloaded from {endpoint} ({type(err).__name__}: {err}); run "
            "again: the files already complete are kept and not fetched again"
        )
    return DownloadError(message.replace(token, "<HF_TOKEN>") if token else message)
