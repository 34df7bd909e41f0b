"""What a downloaded LoRA may be, checked the same way whatever its source: a tarball gives up its
single .safetensors member (streamed, never unpacked to disk; links, devices and paths leaving the
archive refused), and a file is accepted only with a well-formed safetensors header.
"""

from __future__ import annotations

import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

from flux_lora.errors import InputError
from flux_lora.http import CHUNK, too_large

MAX_CONFIG_BYTES = 1024**2
TRIGGER_RE = re.compile(
    r"""^[\s-]*trigger_word\s*:\s*(["']?)(?P<word>[^"'#\n]*?)\1\s*(?:#.*)?$""", re.MULTILINE
)


def extract_safetensors(source: BinaryIO, staged: Path, where: str, max_bytes: int) -> str | None:
    """Stream the tarball's single .safetensors member into `staged`; nothing else touches disk."""
    found: list[str] = []
    names: list[str] = []
    trigger_word = None
    try:
        with tarfile.open(fileobj=source, mode="r|*") as tar:
            for member in tar:
                names.append(member.name)
                if member.name.lower().endswith(".safetensors"):
                    _check_member(member, where)
                    found.append(member.name)
                    if len(found) == 1:
                        if member.size > max_bytes:
                            raise too_large(where, max_bytes)
                        with staged.open("wb") as out:
                            shutil.copyfileobj(tar.extractfile(member), out, CHUNK)
                elif _is_config(member) and trigger_word is None:
                    trigger_word = _trigger_word(tar.extractfile(member).read())
    except tarfile.TarError as err:
        raise InputError(f"{where}: the file is not a readable tar archive ({err})") from None
    if len(found) != 1:
        listing = ", ".join(found if found else names[:20]) or "nothing"
        what = "several .safetensors files" if found else "no .safetensors file"
        raise InputError(f"{where}: the tarball has {what} (found: {listing}); it must hold exactly one")
    return trigger_word


def _check_member(member: tarfile.TarInfo, where: str) -> None:
    if member.name.startswith("/") or re.match(r"^[A-Za-z]:", member.name):
        problem = "an absolute path"
    elif ".." in re.split(r"[/\\]", member.name):
        problem = "a path with '..'"
    elif member.issym() or member.islnk():
        problem = "a link"
    elif not member.isreg():
        problem = "not a regular file"
    else:
        return
    raise InputError(f"{where}: the tarball member {member.name!r} is {problem}; refusing the tarball")


def _is_config(member: tarfile.TarInfo) -> bool:
    return (
        member.name.rsplit("/", 1)[-1] == "config.yaml" and member.isreg() and member.size <= MAX_CONFIG_BYTES
    )


def _trigger_word(raw: bytes) -> str | None:
    match = TRIGGER_RE.search(raw.decode("utf-8", errors="replace"))
    word = match["word"].strip() if match else ""
    return word if word and word not in ("null", "~") else None
