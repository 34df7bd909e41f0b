"""Which transformers live on the GPU: all that fit, the rest waiting in pinned CPU memory.

By the numbers (bf16, FLUX.1 at full size): each transformer is 23.8 GB, its fp8 copy 11.9 GB,
T5-XXL 9.5 GB, CLIP and the VAE under 0.5 GB, and each transformer's LoRA slots 1.4 GB at rank 64.
Both releases in bf16 and fp8 come to about 87 GB: over an 80 GB H100 before any activation. So
the fp8 copies (go_fast, the fast path) and the shared encoders stay on the GPU, and the bf16
transformers share what is left: when both do not fit with `FLUX_LORA_GPU_RESERVE_GB` (default 8)
kept free for activations, the one least recently used waits in pinned CPU memory and is moved
back on demand (about 24 GB over PCIe: a second or less, to be measured). Nothing is ever reloaded
from disk. On the CPU everything is resident and this does nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Hashable

import torch

from flux_lora.errors import InputError

log = logging.getLogger(__name__)

RESERVE_ENV = "FLUX_LORA_GPU_RESERVE_GB"
DEFAULT_RESERVE_GB = 8.0


def module_bytes(module: torch.nn.Module) -> int:
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def evictions(
    sizes: dict[Hashable, int], resident: list[Hashable], evictable: set, need: int, budget: int, keep: set
) -> list:
    """The resident keys to move off, least recently used first (`resident` is in use order,
    oldest first), so that `need` more bytes fit within `budget`; `keep` and the keys not in
    `evictable` stay."""
    used = sum(sizes[key] for key in resident) + need
    out = []
    for key in resident:
        if used <= budget:
            break
        if key in evictable and key not in keep:
            out.append(key)
            used -= sizes[key]
    if used > budget:
        raise MemoryError(
            f"{need / 1024**3:.1f} GiB more does not fit in the GPU budget of {budget / 1024**3:.1f} GiB "
            f"beside what must stay; lower {RESERVE_ENV} or use a larger GPU"
        )
    return out


class Residency:
    """Modules on one device within a byte budget: the evictable ones least recently used move to
    pinned CPU memory when room is needed, and come back on `ensure`."""

    def __init__(self, device: torch.device, budget: int):
        self.device = device
        self.budget = budget
        self.modules: dict[Hashable, torch.nn.Module] = {}
        self.sizes: dict[Hashable, int] = {}
        self.evictable: set = set()
        self.resident: OrderedDict[Hashable, None] = OrderedDict()  # use order, oldest first

    @classmethod
    def for_device(cls, device: torch.device, fixed_bytes: int) -> Residency:
        """The budget on a GPU: its memory less `fixed_bytes` (the shared encoders and VAE) and
        the reserve for activations. Unbounded elsewhere."""
        if device.type != "cuda":
            return cls(device, budget=2**62)
        raw = os.environ.get(RESERVE_ENV, "").strip()
        try:
            reserve = float(raw) if raw else DEFAULT_RESERVE_GB
        except ValueError:
            raise InputError(
                f"{RESERVE_ENV}={raw!r}: set a number of GB (default {DEFAULT_RESERVE_GB})"
            ) from None
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total - fixed_bytes - reserve * 1024**3)
        log.info("GPU budget for transformers: %.1f GiB (%.0f GiB reserved)", budget / 1024**3, reserve)
        return cls(device, budget)

    def add(self, key: Hashable, module: torch.nn.Module, *, evictable: bool = True) -> None:
        """Registers a module that is on the device now (or re-measures one that grew)."""
        self.modules[key] = module
        self.sizes[key] = 0
        self.resident.pop(key, None)
        if evictable:
            self.evictable.add(key)
        self.make_room(module_bytes(module), keep={key})
        self.sizes[key] = module_bytes(module)
        self.resident[key] = None

    def make_room(self, need: int, keep: set | None = None) -> None:
        """Moves evictable modules off until `need` more bytes fit (e.g. a temporary copy)."""
        for old in evictions(
            self.sizes, list(self.resident), self.evictable, need, self.budget, keep or set()
        ):
            started = time.perf_counter()
            module = self.modules[old].to("cpu")
            if torch.cuda.is_available():
                for tensor in [*module.parameters(), *module.buffers()]:
                    tensor.data = tensor.data.pin_memory()  # pinned: the way back runs at full speed
            del self.resident[old]
            log.info(
                "%s moved to pinned CPU memory in %.2f s (GPU budget)", old, time.perf_counter() - started
            )

    def ensure(self, key: Hashable) -> None:
        """`key`'s module is on the device, and the most recently used, when this returns."""
        if key not in self.modules:
            return
        if key not in self.resident:
            self.make_room(self.sizes[key], keep={key})
            started = time.perf_counter()
            self.modules[key].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.resident[key] = None
            log.info("%s moved to %s in %.2f s", key, self.device, time.perf_counter() - started)
        self.resident.move_to_end(key)
