"""Which transformers live on the GPU: all that fit, the rest waiting in pinned CPU memory.

By the numbers (bf16, FLUX.1 at full size): each transformer is 22.2 GiB, its fp8 copy 11.1 GiB,
T5-XXL 8.9 GiB, CLIP and the VAE under 0.5 GiB, and each transformer's LoRA slots 1.3 GiB at rank
64. Both releases in bf16 and fp8 come to about 81 GiB: on an H200 (139 GiB) everything stays on
the GPU and nothing ever moves. On an 80 GB H100 they do not fit beside 8 GiB for activations
(`FLUX_LORA_GPU_RESERVE_GB`), so the fp8 copies (go_fast) and the shared encoders stay, and the
bf16 transformers share what is left: the one least recently used waits in pinned CPU memory, and
setup ends with the default request's (FLUX.1-dev, bf16) on the GPU. Only a bf16 request for the
other release pays a move. Nothing is ever reloaded from disk. On the CPU this does nothing.

A move is one copy of one flat buffer: a module that leaves the GPU gets one pinned buffer, once,
that holds all its tensors at fixed offsets (its home from then on), and coming back it gets one
flat GPU buffer. Pinning tensor by tensor takes 70 s for a full-size transformer on an H200; one
buffer copies at the bus's speed (0.46 s each way there, docs/performance.md).
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Hashable

import torch

from flux_lora.device.tensors import module_bytes
from flux_lora.errors import ConfigError

log = logging.getLogger(__name__)

RESERVE_ENV = "FLUX_LORA_GPU_RESERVE_GB"
DEFAULT_RESERVE_GB = 8.0
ALIGN = 512  # bytes between tensors in a flat buffer: every view stays aligned for any kernel


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


class FlatCopy:
    """All the tensors of one module as views of a single buffer, so the module moves between
    devices in one copy. `home` is the (pinned) CPU buffer, kept for the module's life; `here` is
    the GPU buffer while the module is on the GPU and was moved there by us."""

    def __init__(self, module: torch.nn.Module, pin: bool):
        self.module = module
        self.tensors = _plain_tensors(module)
        self.offsets, total = [], 0
        for tensor in self.tensors:
            total = -(-total // ALIGN) * ALIGN
            self.offsets.append(total)
            total += tensor.numel() * tensor.element_size()
        self.home = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
        self.here: torch.Tensor | None = None

    def to_home(self) -> None:
        """Copies the module into `home` and makes its tensors views of it."""
        if self.here is not None:
            self.home.copy_(self.here, non_blocking=True)  # one copy of the whole module
        else:  # first time: the tensors are wherever they were loaded
            for tensor, view in zip(self.tensors, self._views(self.home), strict=True):
                view.copy_(tensor, non_blocking=True)
        _synchronize()
        self._point_at(self.home)
        self.here = None

    def stale(self) -> bool:
        """True when the module has gained or lost tensors (LoRA adapters) since the layout."""
        return [id(t) for t in _plain_tensors(self.module)] != [id(t) for t in self.tensors]

    def to_device(self, device: torch.device) -> None:
        if self.stale():  # changed while away, which the service avoids: the slow, sure way
            self.module.to(device)
            return
        self.here = torch.empty_like(self.home, device=device)
        self.here.copy_(self.home, non_blocking=True)
        _synchronize()
        self._point_at(self.here)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [
            flat[offset : offset + tensor.numel() * tensor.element_size()]
            .view(tensor.dtype)
            .view(tensor.shape)
            for tensor, offset in zip(self.tensors, self.offsets, strict=True)
        ]

    def _point_at(self, flat: torch.Tensor) -> None:
        for tensor, view in zip(self.tensors, self._views(flat), strict=True):
            tensor.data = view


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
        self.flat: dict[Hashable, FlatCopy] = {}  # modules that have moved: their buffers
        self.moves: list[
            tuple[Hashable, str, float]
        ] = []  # (key, "off" | "on", seconds), for the log and bench

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
            raise ConfigError(
                f"{RESERVE_ENV}={raw!r}: set a number of GB (default {DEFAULT_RESERVE_GB})"
            ) from None
        total = torch.cuda.get_device_properties(device).total_memory
        budget = int(total - fixed_bytes - reserve * 1024**3)
        log.info(
            "GPU budget for transformers: %.1f GiB (%.1f GiB of encoders and VAE, %.0f GiB reserved)",
            budget / 1024**3,
            fixed_bytes / 1024**3,
            reserve,
        )
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
            self.evict(old)

    def evict(self, key: Hashable) -> None:
        """Moves `key`'s module to its pinned home (made on its first move)."""
        started = time.perf_counter()
        if key not in self.flat or self.flat[key].stale():
            self.flat[key] = FlatCopy(self.modules[key], pin=self.device.type == "cuda")
        self.flat[key].to_home()
        del self.resident[key]
        self._moved(key, "off", started)

    def ensure(self, key: Hashable) -> None:
        """`key`'s module is on the device, and the most recently used, when this returns."""
        if key not in self.modules:
            return
        if key not in self.resident:
            self.make_room(self.sizes[key], keep={key})
            started = time.perf_counter()
            self.flat[key].to_device(self.device)
            self.resident[key] = None
            self._moved(key, "on", started)
        self.resident.move_to_end(key)

    def _moved(self, key: Hashable, where: str, started: float) -> None:
        seconds = time.perf_counter() - started
        self.moves.append((key, where, seconds))
        place = "to pinned CPU memory" if where == "off" else f"to {self.device}"
        gib = self.sizes[key] / 1024**3
        log.info("%s moved %s in %.2f s (%.1f GiB, GPU budget)", key, place, seconds, gib)


def _plain_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    tensors = list(dict.fromkeys([*module.parameters(), *module.buffers()]))  # each once, in order
    quantized = [t for t in tensors if type(t) not in (torch.Tensor, torch.nn.Parameter)]
    if quantized:
        raise TypeError(
            f"only modules of plain tensors move between devices, not {type(quantized[0]).__name__}"
        )
    return tensors


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
