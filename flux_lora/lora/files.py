"""A LoRA tarball, whatever its source, gives up its single .safetensors member: streamed, never
unpacked to disk; links, devices and paths leaving the archive refused.

Only plain (uncompressed) tar is read, as Replicate's trainer writes it. A compressed tarball costs
far more to read than it weighs: a 1.6 kB bzip2 file can expand to 2 GB, and gzip, bzip2 and xz
all decompress with no way to stop midway. Refusing them bounds what a tarball costs by its own
size, which the download limits already bound, and every read goes through the caller's reader
(a download's body, or a `CheckedReader`), so a cancel or a limit stops it between chunks. At
most MAX_MEMBERS members are read.
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
MAX_MEMBERS = 256  # the trainer's tarball holds a handful: weights, config, a README
TAR_SNIFF_BYTES = 512  # a tar header block: enough to tell tar and its compressions apart
COMPRESSIONS = {  # magic bytes at the start of the stream -> name
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x5d\x00\x00": "lzma",
}
TRIGGER_RE = re.compile(
    r"""^[\s-]*trigger_word\s*:\s*(["']?)(?P<word>[^"'#\n]*?)\1\s*(?:#.*)?$""", re.MULTILINE
)


def is_tarball(head: bytes) -> bool:
    """Whether a file starting with `head` is a tarball, plain or compressed (to be refused)."""
    return head[257:262] == b"ustar" or compression(head) is not None


def compression(head: bytes) -> str | None:
    return next((name for magic, name in COMPRESSIONS.items() if head.startswith(magic)), None)


def extract_safetensors(source: BinaryIO, staged: Path, where: str, max_bytes: int) -> str | None:
    """Stream the tarball's single .safetensors member into `staged`; nothing else touches disk."""
    head = source.read(TAR_SNIFF_BYTES)
    if kind := compression(head):
        raise InputError(
            f"{where}: the tarball is {kind}-compressed; only plain .tar files are read (as Replicate's "
            "trainer writes them). Send the .safetensors file itself, or an uncompressed .tar"
        )
    found: list[str] = []
    names: list[str] = []
    trigger_word = None
    try:
        with tarfile.open(fileobj=_Prefixed(head, source), mode="r|") as tar:
            for member in tar:
                names.append(member.name)
                if len(names) > MAX_MEMBERS:
                    raise InputError(
                        f"{where}: the tarball has more than {MAX_MEMBERS} members; a LoRA tarball holds a "
                        "few files. Send the .safetensors file itself"
                    )
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


class _Prefixed:
    """`head`, already read from `rest`, then the rest: what tarfile reads after the sniff."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self.head = head
        self.rest = rest

    def read(self, size: int = -1) -> bytes:
        if not self.head:
            return self.rest.read(size)
        if size is None or size < 0:
            data, self.head = self.head + self.rest.read(), b""
            return data
        data, self.head = self.head[:size], self.head[size:]
        return data
