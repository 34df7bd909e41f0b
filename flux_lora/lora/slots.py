"""LoRAs on a compiled transformer: fixed slots written in place, so a swap never recompiles.

A compiled graph is specialised to the modules it traced. peft's usual load and delete add and
remove modules, and every change would recompile (about a minute for a full-size FLUX). So a
transformer that will be compiled first gets SLOTS: one LoRA adapter per input that can name a
LoRA (`replicate_weights`, `extra_lora`), of a declared maximum rank, on every linear layer, with
zero weights (so they add exactly nothing). Activating a LoRA copies its A and B into a slot,
zero-padded to the slot's rank, with B multiplied by the LoRA's per-layer scale (alpha / rank,
as peft computes it) times the request's scale; layers it does not touch are zeroed. Modules,
shapes and dtypes never change, so no compiled guard fails.

The cost: the slots run on every step, LoRA or not, 2 x rank x (in + out) multiply-adds per
token, layer and slot. At rank 64 that is about 3.5% of FLUX.1's arithmetic per slot (from the
layer shapes; to be measured on a GPU). A LoRA of a higher rank is refused, naming the setting.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import torch

from flux_lora.errors import ConfigError, InputError
from flux_lora.lora.adapters import LoraWeights, WantedAdapter, already_in_place, no_stop, read_lora

log = logging.getLogger(__name__)

SLOTS = ("main", "extra")
DEFAULT_MAX_RANK = 64
MAX_RANK_ENV = "FLUX_LORA_MAX_LORA_RANK"


class LoraSlots:
    """The slots of one transformer, and which LoRA (with which scale) each holds."""

    def __init__(self, transformer: torch.nn.Module, max_rank: int):
        self.transformer = transformer
        self.max_rank = max_rank
        self.layers: dict[str, torch.nn.Module] = {}  # module path -> peft LoRA layer
        self.held: dict[str, tuple[str, float] | None] = dict.fromkeys(SLOTS)  # slot -> (identity, scale)

    @classmethod
    def install(cls, transformer: torch.nn.Module, max_rank: int) -> LoraSlots:
        """Adds the empty slots to `transformer`; call before compiling it."""
        from peft import LoraConfig, inject_adapter_in_model

        linear = sorted(
            name for name, module in transformer.named_modules() if isinstance(module, torch.nn.Linear)
        )
        for slot in SLOTS:
            config = LoraConfig(
                r=max_rank, lora_alpha=max_rank, target_modules=linear, init_lora_weights=False
            )
            with warnings.catch_warnings():
                # peft warns when a second adapter joins the first: two slots are the intent.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # Empty (meta) adapter weights: peft's own random initialisation, on the CPU in
                # float32, took 9.7 s a full-size transformer; the slots start as zeros anyway.
                inject_adapter_in_model(config, transformer, adapter_name=slot, low_cpu_mem_usage=True)
        slots = cls(transformer, max_rank)
        for name in linear:
            layer = transformer.get_submodule(name)
            layer.set_adapter(list(SLOTS))  # both slots active, always: the graph never changes
            slots.layers[name] = layer
            for slot in SLOTS:
                _materialise_zeros(layer, slot)
        log.info("LoRA slots: %d of rank %d on %d linear layers", len(SLOTS), max_rank, len(linear))
        return slots

    def activate(
        self, wanted: list[WantedAdapter], multiplier: float = 1.0, check: Callable[[], None] = no_stop
    ) -> float:
        """Makes the slots hold `wanted` (at most one per slot, in order); returns the seconds spent.
        `check` raises to stop (a cancel or a limit): between LoRAs, before any slot is written."""
        if len(wanted) > len(SLOTS):
            raise ValueError(f"at most {len(SLOTS)} LoRAs at once, got {len(wanted)}")
        targets = {slot: None for slot in SLOTS}
        for slot, adapter in zip(SLOTS, wanted, strict=False):
            targets[slot] = (adapter.identity, adapter.scale * multiplier)
        changed = [slot for slot in SLOTS if targets[slot] != self.held[slot]]
        if not changed:
            if wanted:
                log.info("%s", already_in_place(wanted, multiplier))
            return 0.0
        started = time.perf_counter()
        adapters = dict(zip(SLOTS, wanted, strict=False))
        # Read and check every new LoRA before writing any slot: a bad one changes nothing.
        staged = {}
        for slot in changed:
            if adapters.get(slot) is not None:
                check()
                staged[slot] = self._checked(adapters[slot])
        check()
        for slot in changed:
            try:
                if slot in staged:
                    self._write(slot, staged[slot], targets[slot][1])
                else:
                    self._clear(slot)
            except BaseException:
                self._clear(slot)  # never half a LoRA: an interrupted write leaves the slot empty
                raise
            self.held[slot] = targets[slot]
        elapsed = time.perf_counter() - started
        log.info("LoRA slots: %d rewritten in %.3f s (no recompilation)", len(changed), elapsed)
        return elapsed

    def _checked(self, adapter: WantedAdapter) -> tuple[LoraWeights, dict[str, float]]:
        weights = read_lora(adapter.path, adapter.label, adapter.display)
        if not weights.state_dict:
            raise InputError(f"{adapter.label}: {adapter.display} has no weights for the FLUX transformer.")
        where = f"{adapter.label}: {adapter.display}"
        scales = _layer_scales(weights, where)
        for path in scales:
            layer = self.layers.get(path)
            if layer is None:
                raise InputError(
                    f"{where}: the layer {path} is not a linear layer of the FLUX transformer. Is it a LoRA "
                    "for FLUX.1 [dev] or [schnell], not another model?"
                )
            down, up = (
                weights.state_dict[f"{path}.lora_A.weight"],
                weights.state_dict[f"{path}.lora_B.weight"],
            )
            base = layer.get_base_layer()
            if (
                down.shape[1] != base.in_features
                or up.shape[0] != base.out_features
                or up.shape[1] != down.shape[0]
            ):
                raise InputError(
                    f"{where}: the shapes at {path} ({tuple(down.shape)}, {tuple(up.shape)}) do not fit the layer "
                    f"({base.in_features} -> {base.out_features}). Is it a LoRA for FLUX.1 [dev] or [schnell]?"
                )
            if down.shape[0] > self.max_rank:
                raise InputError(
                    f"{where}: rank {down.shape[0]} is above this container's maximum of {self.max_rank} for "
                    f"compiled transformers. Use a LoRA of rank {self.max_rank} or less, or raise "
                    f"{MAX_RANK_ENV} (costs speed on every request)."
                )
        return weights, scales

    def _write(self, slot: str, checked: tuple[LoraWeights, dict[str, float]], scale: float) -> None:
        weights, scales = checked
        with torch.no_grad():
            for path, layer in self.layers.items():
                if path not in scales:
                    self._zero(layer, slot)
                    continue
                down = weights.state_dict[f"{path}.lora_A.weight"]
                up = weights.state_dict[f"{path}.lora_B.weight"] * (scales[path] * scale)
                rank = down.shape[0]
                target_a, target_b = layer.lora_A[slot].weight, layer.lora_B[slot].weight
                target_a.zero_()
                target_b.zero_()
                target_a[:rank].copy_(down)
                target_b[:, :rank].copy_(up)

    def _clear(self, slot: str) -> None:
        for layer in self.layers.values():
            self._zero(layer, slot)
        self.held[slot] = None

    @staticmethod
    def _zero(layer: torch.nn.Module, slot: str) -> None:
        with torch.no_grad():
            layer.lora_A[slot].weight.zero_()
            layer.lora_B[slot].weight.zero_()


def _materialise_zeros(layer: torch.nn.Module, slot: str) -> None:
    """The slot's A and B as zeros beside the base weight, in its device and dtype (the serving
    dtype; an fp8 weight reports the dtype it stands for)."""
    base = layer.get_base_layer().weight
    for adapter in (layer.lora_A[slot], layer.lora_B[slot]):
        shape = adapter.weight.shape
        adapter.weight = torch.nn.Parameter(
            torch.zeros(shape, device=base.device, dtype=base.dtype), requires_grad=False
        )


def max_rank_from_env(raw: str | None) -> int:
    raw = (raw or "").strip()
    if not raw:
        return DEFAULT_MAX_RANK
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(
            f"{MAX_RANK_ENV}={raw!r}: set a whole number of at least 1 (default {DEFAULT_MAX_RANK})"
        )
    return int(raw)


def _layer_scales(weights: LoraWeights, where: str) -> dict[str, float]:
    """Per layer, the factor peft applies to B @ A for this file (alpha / rank, or alpha / sqrt(rank)
    with rsLoRA), computed from the config diffusers would build for it."""
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    state_dict = weights.state_dict
    unsupported = sorted(key for key in state_dict if not key.endswith((".lora_A.weight", ".lora_B.weight")))
    if unsupported:
        raise InputError(
            f"{where}: keys like {', '.join(unsupported[:3])} (LoRA biases, DoRA or other adapter types) "
            "cannot be applied to a compiled transformer; this container compiles (FLUX_LORA_COMPILE)"
        )
    ranks = {f"^{key}": value.shape[1] for key, value in state_dict.items() if key.endswith(".lora_B.weight")}
    config = _create_lora_config(state_dict, weights.network_alphas, weights.metadata, ranks)
    scales: dict[str, float] = {}
    for key in ranks:
        path = key[1:].removesuffix(".lora_B.weight")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), path), config.r)
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha
        )
        scales[path] = float(alpha) / (rank**0.5 if config.use_rslora else rank)
    return scales
