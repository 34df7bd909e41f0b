"""Fetching the real FLUX.1 weights and the safety models into FLUX_MODEL_DIR, and checking them.

`scripts/download-weights` runs `main()`. Each folder of MODEL_REPOS comes from its Hugging Face
repo through huggingface_hub (HF_ENDPOINT, HF_TOKEN), with only the files the pipeline loads:
chosen from one listing of the repo, so the single-file checkpoints that duplicate the diffusers
folders, images and licences stay on the Hub.

A folder is fetched into `FLUX_MODEL_DIR/.downloads/<folder>` with huggingface_hub's local-dir
download (hf_hub_download at the listed commit, 8 files at a time). Resuming is huggingface_hub's:
a file complete there is not fetched again by a later run, not even asked about (its metadata in
`.cache/huggingface/` names the commit); a connection cut in the middle of a file is resumed in
the same run with a Range request from the last whole chunk written (10 MB); a run that is killed
loses only the files in flight, whose partial copies the next run deletes and fetches again.
Once every file is there the folder is checked, marked complete (`.flux-lora-complete`, listing
the files, their sizes and the content ids the Hub listed: LFS SHA-256 or git blob id) and renamed
into place, so a folder under FLUX_MODEL_DIR never holds a partial download. A file whose content
id a complete folder there already holds (FLUX.1-schnell's text encoders, tokenizers and VAE are
FLUX.1-dev's, 9.9 GB) is hard-linked from it, not fetched. Tokens never reach a message or a log.
What is said to the Hub, and the error for each way it fails, is in `models.hub`.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager, suppress
from pathlib import Path

from flux_lora.errors import DownloadError, FluxLoraError, ModelNotFoundError
from flux_lora.models.files import (
    HF_CACHE,
    MARKER,
    MODEL_REPOS,
    check_folder,
    folders_in_scope,
    is_complete,
    missing_models,
    recorded_ids,
    verify_models,
)
from flux_lora.models.hub import (
    RepoPlan,
    check_access,
    endpoint_url,
    fetch_file,
    list_repo,
    progress_class,
    total_size,
)

log = logging.getLogger("flux_lora.models.download")  # also when run as __main__

STAGING = ".downloads"
WORKERS = 8
SIGNAL_CHECK_S = 0.2

# --- downloading -----------------------------------------------------------------------------


def download_models(
    root: Path,
    *,
    token: str | None = None,
    endpoint: str | None = None,
    folders: list[str] | None = None,
    progress: bool = True,
) -> None:
    """Fetch every folder of `folders` (default: all of MODEL_REPOS) that is not complete under `root`.

    Every repo is listed and every gated one's access checked before any file is fetched, so a
    missing or refused token fails at once. Raises DownloadError with the reason and the fix."""
    root = Path(root)
    token = (token if token is not None else os.environ.get("HF_TOKEN", "")).strip() or None
    endpoint = endpoint_url(endpoint)
    missing = set(missing_models(root))
    todo = [f for f in folders_in_scope(folders) if f in missing]
    for folder in folders_in_scope(folders):
        if folder not in missing:
            log.info("%s: already complete in %s", folder, root)
    if not todo:
        return
    plans = [list_repo(folder, token, endpoint) for folder in todo]
    for plan in plans:
        check_access(plan, token, endpoint)
    _log_plans(plans, root)
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        for plan in plans:
            if is_complete(root / plan.folder, plan.folder):  # another run finished it meanwhile
                log.info("%s: already complete in %s", plan.folder, root)
                continue
            _download(plan, root, token, endpoint, progress)
        with suppress(OSError):  # not empty: something else is staged there
            (root / STAGING).rmdir()


def _log_plans(plans: list[RepoPlan], root: Path) -> None:
    def size(n: int | None) -> str:
        if n is None:
            return "size not reported"
        for unit in ("B", "kB", "MB", "GB"):
            if n < 1000 or unit == "GB":
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1000

    for plan in plans:
        log.info(
            "%s <- %s @ %s: %d files, %s",
            plan.folder, plan.repo_id, plan.revision[:10], len(plan.files), size(plan.size),
        )  # fmt: skip
        groups: dict[str, list[int | None]] = {}
        for name, n in plan.files.items():
            groups.setdefault(name.split("/")[0] + ("/" if "/" in name else ""), []).append(n)
        for group, sizes in sorted(groups.items()):
            log.info("  %-24s %3d file(s)  %s", group, len(sizes), size(total_size(sizes)))
        if plan.skipped:
            shown = ", ".join(plan.skipped[:8]) + (", ..." if len(plan.skipped) > 8 else "")
            log.info("  not fetched (the pipeline does not load them): %s", shown)
    total = total_size(p.size for p in plans)
    log.info(
        "To fetch into %s: at most %s (files complete there, or in another folder there, are not fetched again)",
        root,
        size(total),
    )


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """One download into `root` at a time, across processes."""
    handle = os.open(root, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Another download into %s is running: waiting for it", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _download(plan: RepoPlan, root: Path, token: str | None, endpoint: str, progress: bool) -> None:
    started = time.monotonic()
    staging, final = root / STAGING / plan.folder, root / plan.folder
    staging.parent.mkdir(exist_ok=True)
    if final.exists():  # incomplete (else it was skipped)
        if staging.exists():
            log.warning(
                "%s: removing the incomplete %s (a staged download is resumed instead)", plan.folder, final
            )
            shutil.rmtree(final)
        else:
            log.info("%s: resuming from the incomplete %s", plan.folder, final)
            final.rename(staging)
    # Partial files of a run that was killed: huggingface_hub never reuses them (their names are
    # unique to the run that wrote them); under the lock no other run is writing one.
    for orphan in (staging / HF_CACHE).rglob("*.incomplete"):
        orphan.unlink(missing_ok=True)
    linked = _link_identical(plan, staging, root)
    _fetch(plan, [name for name in plan.files if name not in linked], staging, token, endpoint, progress)
    shutil.rmtree(staging / HF_CACHE, ignore_errors=True)
    try:
        check_folder(staging, plan.folder)
    except ModelNotFoundError as err:
        raise DownloadError(
            f"{plan.folder}: the files fetched from {plan.repo_id} do not check out: {err}"
        ) from err
    marker = {"repo": plan.repo_id, "revision": plan.revision, "files": plan.files, "ids": plan.ids}
    (staging / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
    staging.rename(final)
    log.info("%s: complete in %s (%.0f s)", plan.folder, final, time.monotonic() - started)


def _link_identical(plan: RepoPlan, staging: Path, root: Path) -> set[str]:
    """Files of `plan` that a complete folder under `root` holds with the same content id and
    size, hard-linked into `staging`: the names linked (none where the file system refuses)."""
    holders: dict[str, Path] = {}
    for folder in MODEL_REPOS:
        if folder != plan.folder:
            for name, content_id in recorded_ids(root / folder).items():
                holders.setdefault(content_id, root / folder / name)
    linked: dict[str, int] = {}
    for name, content_id in plan.ids.items():
        source = holders.get(content_id)
        size = plan.files[name]
        if source is None or size is None or source.stat().st_size != size:
            continue
        target = staging / name
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            target.unlink(missing_ok=True)
            os.link(source, target)
        except OSError as err:
            log.info("%s: could not link %s to %s (%s): fetching it", plan.folder, name, source, err.strerror)
            continue
        linked[name] = size
    if linked:
        sources = sorted({holders[plan.ids[name]].relative_to(root).parts[0] for name in linked})
        log.info(
            "%s: %d file(s), %.1f GB, the same as in %s: linked, not fetched",
            plan.folder, len(linked), sum(linked.values()) / 1e9, ", ".join(sources),
        )  # fmt: skip
    return set(linked)


def _fetch(
    plan: RepoPlan, names: list[str], staging: Path, token: str | None, endpoint: str, progress: bool
) -> None:
    """The plan's files `names` into `staging`, WORKERS at a time, one progress bar for the folder."""
    from tqdm.auto import tqdm

    bar = None
    if progress:
        total = total_size(plan.files[name] for name in names)
        bar = tqdm(total=total, desc=plan.folder, unit="B", unit_scale=True)
    lock = threading.Lock()

    def fetch_one(name: str) -> None:
        counted = [0]
        path = fetch_file(plan, name, staging, token, endpoint, progress_class(bar, lock, counted))
        size, expected = path.stat().st_size, plan.files[name]
        if expected is not None and size != expected:
            path.unlink()
            raise DownloadError(
                f"{plan.folder}: {name} from {plan.repo_id} has {size} bytes, not the {expected} the "
                "Hub lists; run again"
            )
        if bar is not None:
            with lock:
                bar.update(size - counted[0])  # files found complete report nothing

    pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="download-weights")
    interrupted = False
    try:
        futures = [pool.submit(fetch_one, name) for name in names]
        # Wait in slices, so Python's signal handlers (Ctrl-C) run within SIGNAL_CHECK_S even if
        # the kernel hands the signal to a download thread rather than to this one.
        pending = futures
        while pending:
            done, pending = wait(pending, timeout=SIGNAL_CHECK_S, return_when=FIRST_EXCEPTION)
            for future in done:
                future.result()
    except KeyboardInterrupt:
        interrupted = True  # main() exits at once
        raise
    finally:
        # After an error the files in flight still finish (they are kept for the next run).
        pool.shutdown(wait=not interrupted, cancel_futures=True)
        if bar is not None:
            bar.close()


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    from flux_lora.models.layout import DEFAULT_MODEL_DIR

    parser = argparse.ArgumentParser(
        prog="scripts/download-weights",
        description=(
            "Fetch FLUX.1-dev (gated: accept its licence on Hugging Face and set HF_TOKEN), FLUX.1-schnell "
            "and the two safety models into $FLUX_MODEL_DIR (default weights/), in the diffusers layout, "
            "only the files the pipeline loads. Interrupted downloads resume where they stopped (per "
            "file). HF_ENDPOINT picks another hub."
        ),
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=list(MODEL_REPOS),
        metavar="FOLDER",
        help=f"fetch and check only this folder (repeatable): {', '.join(MODEL_REPOS)}",
    )
    parser.add_argument(
        "--load",
        action="store_true",
        help="also load every model the way the server does; for the real FLUX weights that takes about "
        "60 GB of GPU memory on a CUDA GPU (bf16) or about 115 GB of RAM on a CPU (fp32)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("flux_lora").setLevel(logging.INFO)  # ours; not every request httpx2 makes
    root = Path(os.environ.get("FLUX_MODEL_DIR") or DEFAULT_MODEL_DIR).expanduser()
    try:
        download_models(root, folders=args.only, progress=not args.no_progress)
        verify_models(root, load=args.load, folders=args.only)
    except FluxLoraError as err:
        print(f"download-weights: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # Downloads still in flight would hold the exit until they end: leave now. Complete files
        # are in place and partial ones are deleted by the next run, so nothing is lost.
        print("download-weights: interrupted; run it again to resume", file=sys.stderr, flush=True)
        os._exit(130)
    checked = "load" if args.load else "check out"
    log.info("%s in %s: present and %s", ", ".join(args.only or MODEL_REPOS), root, checked)
    return 0


if __name__ == "__main__":
    sys.exit(main())
