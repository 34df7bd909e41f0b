"""Where the models run, and in which dtype.

The device is the CUDA GPU when torch sees one, else the CPU. The serving dtype is
`FLUX_LORA_DTYPE`: `auto` (default) is bf16 on CUDA, what FLUX runs in there, and fp32 on the CPU,
which has no fast bf16 matmul. Naming the dtype lets the CPU serve in the GPU's dtype, so a fault
that only shows in bf16 (a library call that casts, a default dtype) shows in CI too.
"""

from __future__ import annotations

import os

import torch

from flux_lora.errors import ConfigError

DTYPE_ENV = "FLUX_LORA_DTYPE"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def serving_dtype(device: torch.device) -> torch.dtype:
    """`FLUX_LORA_DTYPE`, with `auto` resolved for `device`."""
    raw = os.environ.get(DTYPE_ENV, "").strip().lower() or "auto"
    if raw == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if raw not in DTYPES:
        raise ConfigError(
            f"{DTYPE_ENV}={raw!r}: set auto (bf16 on CUDA, fp32 on the CPU), {', '.join(DTYPES)}"
        )
    return DTYPES[raw]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
