"""Checking that a file is well-formed safetensors from its header alone, without reading the data.

Every LoRA is checked before it is cached, and every weights file of a model folder before setup
counts the folder complete: a login page saved under a .safetensors name, a truncated download or
a header that lies about its tensors is refused with the reason.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NoReturn

from flux_lora.errors import InputError

MAX_HEADER_BYTES = 100 * 1024**2
# Bits per element of every dtype the safetensors format names; any other dtype is refused.
BITS = (
    (64, "F64 I64 U64 C64"),
    (32, "F32 I32 U32"),
    (16, "F16 BF16 I16 U16"),
    (8, "I8 U8 BOOL F8_E4M3 F8_E5M2 F8_E8M0"),
    (6, "F6_E2M3 F6_E3M2"),
    (4, "F4"),
)
DTYPE_BITS = {dtype: bits for bits, names in BITS for dtype in names.split()}


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
    except RecursionError:
        _not_safetensors(where, "its header is JSON nested too deep to be a tensor table")
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
        if dtype not in DTYPE_BITS:
            _not_safetensors(where, f"tensor {name!r} has the unknown dtype {dtype[:20]!r}")
        if offsets[1] - offsets[0] != -(-math.prod(shape) * DTYPE_BITS[dtype] // 8):
            _not_safetensors(
                where, f"tensor {name!r} has {offsets[1] - offsets[0]} bytes for its shape {shape[:8]}"
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
