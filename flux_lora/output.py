"""Saving generated images in the requested format and quality, in a folder of the server's own."""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

# output_format -> Pillow's format name
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}
OUTPUT_ROOT_PREFIX = "flux-lora-out-"  # then the server's process id


def new_output_root(parent: Path | None = None) -> Path:
    """A new folder for this process's outputs, `flux-lora-out-<pid>-*` in `parent` (default: the
    temp folder), after removing those of processes that have exited.

    coglet stops its Python worker with a signal, which runs neither `atexit` nor `finally`, so a
    server cannot remove its own folder (it held the last prediction's files). The next server
    start does. Folders of live processes, and any without a process id, are left alone.
    """
    parent = Path(parent or tempfile.gettempdir())
    for folder in parent.glob(f"{OUTPUT_ROOT_PREFIX}*-*"):
        owner = folder.name.removeprefix(OUTPUT_ROOT_PREFIX).split("-", 1)[0]
        if owner.isdigit() and not _process_alive(int(owner)):
            shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{OUTPUT_ROOT_PREFIX}{os.getpid()}-", dir=parent))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def save_images(images: list[Image.Image], folder: Path, output_format: str, quality: int) -> list[Path]:
    """Write `out-0.<ext>`, `out-1.<ext>`, ... into `folder`; quality is ignored for png.

    Pillow's default encoder effort is kept, so files match other FLUX servers' for the same
    quality. Several images are encoded in parallel: Pillow releases the GIL while encoding
    (4 webp files of 1024x1024 on 2 cores: 224 ms one by one, 116 ms in threads).
    """
    pil_format = PIL_FORMATS[output_format]
    options = {} if pil_format == "PNG" else {"quality": quality}
    paths = [folder / f"out-{index}.{output_format}" for index in range(len(images))]

    def save(index: int) -> None:
        images[index].save(paths[index], format=pil_format, **options)

    if len(images) == 1:
        save(0)
    else:
        with ThreadPoolExecutor(max_workers=len(images)) as pool:
            list(pool.map(save, range(len(images))))
    return paths
