"""What a downloaded LoRA may be, checked the same way whatever its source: a tarball gives up its
single .safetensors member (streamed, never unpacked to disk; links, devices and paths leaving the
archive refused), and a file is accepted only with a well-formed safetensors header.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO, NoReturn

from flux_lora.download import CHUNK, too_large
from flux_lora.errors import InputError

MAX_HEADER_BYTES = 100 * 1024**2
MAX_CONFIG_BYTES = 1024**2
# Bytes per element, for the dtypes whose size is whole (others skip the size check).
SIZES = (
    (8, "F64 I64 U64"),
    (4, "F32 I32 U32"),
    (2, "F16 BF16 I16 U16"),
    (1, "I8 U8 BOOL F8_E4M3 F8_E5M2 F8_E8M0"),
)
DTYPE_BYTES = {dtype: size for size, names in SIZES for dtype in names.split()}
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


def verify_safetensors(path: Path, where: str) -> None:
    """Raise InputError unless `path` is a well-formed safetensors file (checks the header, not the data)."""
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if length < 0:
            _not_safetensors(where, f"{size} bytes is too short")
        if head.lstrip().startswith(b"<"):
            _not_safetensors(where, "it looks like an HTML page: a login or error page?")
        if length > MAX_HEADER_BYTES or 8 + length > size:
            _not_safetensors(where, f"its header claims {length} bytes, in a file of {size}")
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        _not_safetensors(where, "its header is not JSON")
    if not isinstance(header, dict):
        _not_safetensors(where, "its header is not a JSON object")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        info = info if isinstance(info, dict) else {}
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not (
            isinstance(dtype, str)
            and isinstance(shape, list)
            and all(isinstance(n, int) and n >= 0 for n in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(n, int) for n in offsets)
            and 0 <= offsets[0] <= offsets[1]
        ):
            _not_safetensors(where, f"tensor {name!r} has no valid dtype, shape and data_offsets")
        if dtype in DTYPE_BYTES and offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[dtype]:
            _not_safetensors(
                where, f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for its shape {shape}"
            )
        spans.append((offsets[0], offsets[1], name))
    if not spans:
        _not_safetensors(where, "it holds no tensors")
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            _not_safetensors(where, f"tensor {name!r} does not start where the previous one ends")
        position = end
    if position != size - 8 - length:
        _not_safetensors(where, f"its tensors cover {position} bytes but the file holds {size - 8 - length}")


def _not_safetensors(where: str, reason: str) -> NoReturn:
    raise InputError(f"{where}: the file at that reference is not a safetensors file ({reason})")
