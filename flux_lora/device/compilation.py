"""torch.compile for the serving transformers: paid at setup, not by the first user.

Each transformer (dev and schnell, bf16 and fp8) gets its LoRA slots, is compiled in place (its
repeated blocks, each class one graph for every image size and batch; with fp8 matmuls, one for a
batch of one and one for larger ones), then warmed up on every size the schema serves (each
preset at both megapixel settings, one and several outputs). Inductor's results are saved as
torch's cache artifacts in `FLUX_LORA_COMPILE_CACHE` and loaded first on the next start, and
Inductor's and Triton's own disk caches live in the same folder, so a warm restart skips code
generation and kernel builds.

Every compilation goes through a counting backend: the log, the benchmark and the tests read how
many happened, so a LoRA swap or a new size that recompiles shows up as a number, not a stall.

`FLUX_LORA_COMPILE`: `auto` (default: on CUDA only), `1` or `0`. `FLUX_LORA_COMPILE_BACKEND`:
`inductor` (default); the CPU tests use `eager`, which traces, guards and recompiles exactly as
inductor would but generates no code. `FLUX_LORA_WARM_UP`: `all` (default) or `quick` (one size
with one and with two outputs; for tests and local checks).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch._dynamo.decorators import mark_unbacked

from flux_lora.errors import ConfigError

log = logging.getLogger(__name__)

COMPILE_ENV = "FLUX_LORA_COMPILE"
BACKEND_ENV = "FLUX_LORA_COMPILE_BACKEND"
CACHE_ENV = "FLUX_LORA_COMPILE_CACHE"
WARM_UP_ENV = "FLUX_LORA_WARM_UP"
WARM_UP_MODES = ("all", "quick")
# A repeated block's tensor inputs, each with the batch first.
BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "temb")


@dataclass(frozen=True)
class CompileSettings:
    enabled: bool
    backend: str = "inductor"
    cache_dir: Path | None = None
    warm_up: str = "all"  # "quick": one size, one and two outputs (tests, local checks)

    @classmethod
    def from_env(cls, device: torch.device, default_cache_dir: Path) -> CompileSettings:
        mode = os.environ.get(COMPILE_ENV, "auto").strip().lower() or "auto"
        if mode not in ("auto", "1", "0"):
            raise ConfigError(f"{COMPILE_ENV}={mode!r}: set auto (compile on CUDA GPUs), 1 or 0")
        enabled = device.type == "cuda" if mode == "auto" else mode == "1"
        backend = os.environ.get(BACKEND_ENV, "inductor").strip() or "inductor"
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"{BACKEND_ENV}={backend!r} is not a torch.compile backend (try inductor)")
        cache = os.environ.get(CACHE_ENV, "").strip()
        warm_up = os.environ.get(WARM_UP_ENV, "all").strip().lower() or "all"
        if warm_up not in WARM_UP_MODES:
            raise ConfigError(f"{WARM_UP_ENV}={warm_up!r}: set all (every served size, default) or quick")
        return cls(enabled, backend, Path(cache) if cache else default_cache_dir, warm_up)


class Compiler:
    """Compiles modules in place through one counting backend, and keeps torch's caches."""

    def __init__(self, settings: CompileSettings, device: torch.device):
        self.settings = settings
        self.device = device
        self.compilations = 0
        self._backend = torch._dynamo.lookup_backend(settings.backend)
        # Duck shaping gives dimensions of equal size one symbol: 1024x1024 has 4096 image tokens,
        # as wide as T5's output, and the context embedder's fixed 4096 then pins the token
        # count to 4096 (seen on the tiny model with 64 tokens and 64 channels): one graph per size.
        torch.fx.experimental._config.use_duck_shape = False
        if settings.cache_dir is not None:
            # Inductor's and Triton's own disk caches (compiled kernels: on the CPU the C++ builds,
            # which the cache artifacts do not hold) in the same lasting folder. Set outright:
            # torch writes its /tmp default into the environment the first time it looks.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(settings.cache_dir / "inductor")
            os.environ["TRITON_CACHE_DIR"] = str(settings.cache_dir / "triton")
        # The four transformers share each block class's forward, whose compiled entries dynamo
        # caps at 8 by default, then runs eagerly without a word: keep a wide margin over the 2
        # (bf16 and fp8) it needs.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        # The blocks' only Python floats are constants (peft's scaling: a LoRA's scale is folded
        # into its slot's weights). Left symbolic, Inductor's scalar pass specialised them anyway,
        # by restarting each fp8 graph's whole trace: 18 s of a cold start on the CPU.
        torch._dynamo.config.specialize_float = True

    def compile(self, module: torch.nn.Module, *, unbacked_batch: bool = True) -> None:
        """Regional compilation of the blocks the model declares repeated (FLUX: 19 double and 38
        single): each class is traced once and its graph shared by every instance, so a start
        traces two small graphs, not a 57-block one. The embedders and output layers, a sliver
        of the arithmetic, stay eager.

        `unbacked_batch=False` is for weights that quantize their input as it comes (go_fast's fp8
        matmuls): torchao's scale arithmetic branches on a batch of one, which dynamo cannot
        decide for an unbacked batch, so it broke each block into pieces (18 graphs for one
        transformer, with torchao's Python between them, seen on the CPU). There a batch of one
        and larger ones get a graph each."""
        repeated = module._repeated_blocks
        for block in [m for m in module.modules() if type(m).__name__ in repeated]:
            compiled = torch.compile(block.forward, backend=self._count_and_compile, dynamic=True)
            block.forward = _calls_sharing_graphs(
                compiled, eager=block.forward, unbacked_batch=unbacked_batch
            )

    def _count_and_compile(self, graph: torch.fx.GraphModule, example_inputs: list):
        self.compilations += 1
        started = time.perf_counter()
        compiled = self._backend(graph, example_inputs)
        log.info(
            "torch.compile: graph %d (%d nodes) compiled in %.1f s",
            self.compilations,
            len(graph.graph.nodes),
            time.perf_counter() - started,
        )
        return compiled

    @property
    def cache_file(self) -> Path | None:
        if self.settings.cache_dir is None:
            return None
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        key = f"torch-{torch.__version__}-{name}-{self.settings.backend}".replace(" ", "_").replace("/", "_")
        return self.settings.cache_dir / f"{key}.bin"

    def load_cache(self) -> bool:
        """Loads saved artifacts before any compilation; True when there were some."""
        path = self.cache_file
        if path is None or not path.is_file():
            return False
        started = time.perf_counter()
        try:
            torch.compiler.load_cache_artifacts(path.read_bytes())
        except Exception as err:  # a cache from another build: compiling from scratch still works
            log.warning("torch.compile: ignoring the cache %s (%s)", path, err.__class__.__name__)
            return False
        log.info("torch.compile: cache loaded from %s in %.2f s", path, time.perf_counter() - started)
        return True

    def save_cache(self) -> None:
        path = self.cache_file
        artifacts = torch.compiler.save_cache_artifacts()
        if path is None or artifacts is None or not artifacts[0]:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        partial.write_bytes(artifacts[0])
        partial.replace(path)  # atomic: a start that reads it never sees half a file
        log.info("torch.compile: cache saved to %s (%d bytes)", path, len(artifacts[0]))


def _calls_sharing_graphs(compiled: Callable, eager: Callable, *, unbacked_batch: bool) -> Callable:
    """A block's forward that reaches its class's graph whatever the size and batch and wherever
    the block sits. Left to itself, torch traces each block class three times: a batch of one
    apart from larger ones (it specialises sizes 0 and 1), and the first single block apart from
    the others, which are handed views into one (batch, text + image, width) tensor, whose first
    stride the graph guards on. So every input is given a fresh tensor's strides, and the batch
    is unbacked where the block allows it (a size the graph never learns, hinted as 1, the default
    request's, where Inductor tunes). On this project's CPU all of it costs about 1 ms a step,
    which the GPU's work hides.

    One image token (img2img from a 16x16 image) would be specialised too, into graphs for that
    one tiny size; it runs eagerly."""

    def forward(**inputs: Any) -> Any:
        if inputs["hidden_states"].shape[1] == 1:
            return eager(**inputs)
        for name in BATCHED_INPUTS:
            tensor = _densely_laid_out(inputs[name])
            if unbacked_batch:
                mark_unbacked(tensor, 0, hint_override=1, shape_id="batch")
            inputs[name] = tensor
        return compiled(**inputs)

    return forward


def _densely_laid_out(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor with a fresh tensor's strides: itself, the same memory restrided (a batch of
    one, whose first stride addresses nothing), or else a copy (several outputs, into each
    single block: 27 MiB an image at 1 megapixel in bf16)."""
    strides = _dense_strides(tensor.shape)
    if tensor.stride() == strides:
        return tensor
    if tensor.shape[0] == 1 and tensor.stride()[1:] == strides[1:]:
        return tensor.as_strided(tensor.shape, strides, tensor.storage_offset())
    return tensor.clone(memory_format=torch.contiguous_format)


@functools.lru_cache(maxsize=64)
def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.insert(0, step)
        step *= size
    return tuple(strides)
