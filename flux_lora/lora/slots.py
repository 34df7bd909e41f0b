"""LoRAs on a compiled transformer: fixed slots written in place, so a swap never recompiles.

A compiled graph is specialised to the modules it traced. peft's usual load and delete add and
remove modules, and every change would recompile (about a minute for a full-size FLUX). So a
transformer that will be compiled first gets SLOTS: one LoRA adapter per input that can name a
LoRA (`replicate_weights`, `extra_lora`), of a declared maximum rank, on every linear layer, with
zero weights (so they add exactly nothing). Activating a LoRA copies each layer's update
(`flux_lora.lora.updates`: the file's scale already folded in) into a slot, zero-padded to the
slot's rank, with up multiplied by the request's scale; layers it does not touch are zeroed. Bias
updates are written into the layers' biases (`ParameterPatches`). Modules, shapes and dtypes
never change, so no compiled guard fails.

An update of a higher rank than the slot's (a LoKr, a LoHa of rank 8 x 16, DoRA, a weight
difference) is written into the layer's weight instead, exactly, the original kept for the next
swap (`ParameterPatches`). The fp8 copy's weights cannot take that without quantizing again at
every swap, so there it is replaced by its best approximation of the slot's rank (truncated SVD,
the Eckart-Young optimum in the Frobenius norm), and the log says which layers and by how much.

The cost: the slots run on every step, LoRA or not, 2 x rank x (in + out) multiply-adds per
token, layer and slot. At rank 64 that is about 3.5% of FLUX.1's arithmetic per slot (from the
layer shapes; to be measured on a GPU).
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable

import torch

from flux_lora.errors import ConfigError
from flux_lora.lora.adapters import WantedAdapter, already_in_place, no_stop, read_lora
from flux_lora.lora.names import ModuleNames, linear_layers
from flux_lora.lora.patches import ParameterPatches
from flux_lora.lora.updates import Update

log = logging.getLogger(__name__)

SLOTS = ("main", "extra")
DEFAULT_MAX_RANK = 64
MAX_RANK_ENV = "FLUX_LORA_MAX_LORA_RANK"


class LoraSlots:
    """The slots of one transformer, and which LoRA (with which scale) each holds."""

    def __init__(self, transformer: torch.nn.Module, max_rank: int):
        self.transformer = transformer
        self.max_rank = max_rank
        self.names = ModuleNames.of(transformer)
        self.patches = ParameterPatches(transformer)
        self.names.pristine = self.patches.original_weight  # DoRA normalises the weight as loaded
        self.patch_scales: dict[str, float] = {}  # slot -> the scale its parameter updates are applied at
        self.layers: dict[str, torch.nn.Module] = {}  # module path -> peft LoRA layer
        self.held: dict[str, tuple[str, float] | None] = dict.fromkeys(SLOTS)  # slot -> (identity, scale)

    @classmethod
    def install(cls, transformer: torch.nn.Module, max_rank: int) -> LoraSlots:
        """Adds the empty slots to `transformer`; call before compiling it."""
        from peft import LoraConfig, inject_adapter_in_model

        linear = sorted(linear_layers(transformer))
        for slot in SLOTS:
            config = LoraConfig(
                r=max_rank,
                lora_alpha=max_rank,
                target_modules=linear,
                init_lora_weights=False,
            )
            with warnings.catch_warnings():
                # peft warns when a second adapter joins the first: two slots are the intent.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # On the fp8 copy: peft says its layers cannot merge; slots are never merged.
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
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

    def _checked(self, adapter: WantedAdapter) -> tuple[dict[str, Update], dict[str, torch.Tensor]]:
        """The updates to write (in a slot, or into the weight above the slot's rank), and the
        norm differences."""
        converted = read_lora(adapter.path, adapter.label, adapter.display, self.names)
        updates = {}
        errors = {}
        for path, update in converted.updates.items():
            if update.rank > self.max_rank and not self.patches.mergeable(path):
                # On the layer's device: the SVD of a full-rank layer takes seconds on a CPU.
                device = self.layers[path].get_base_layer().weight.device
                update, errors[path] = best_of_rank(update, self.max_rank, device)
            updates[path] = update
        merged = sum(1 for update in updates.values() if update.rank > self.max_rank)
        if merged:
            log.info(
                "%s: %d of %d layers above rank %d (%s) written into the weights, exactly",
                adapter.label,
                merged,
                len(updates),
                self.max_rank,
                MAX_RANK_ENV,
            )
        if errors:
            worst = max(errors, key=errors.get)
            log.info(
                "%s: %d of %d layers above rank %d approximated at that rank (%s; fp8 weights cannot "
                "take the update): relative error of the update mean %.3g, max %.3g at %s",
                adapter.label,
                len(errors),
                len(updates),
                self.max_rank,
                MAX_RANK_ENV,
                sum(errors.values()) / len(errors),
                errors[worst],
                worst,
            )
        return updates, converted.norms

    def _write(
        self, slot: str, checked: tuple[dict[str, Update], dict[str, torch.Tensor]], scale: float
    ) -> None:
        updates, norms = checked
        merged = {path: update for path, update in updates.items() if update.rank > self.max_rank}
        with torch.no_grad():
            for path, layer in self.layers.items():
                self._zero(layer, slot)
                update = updates.get(path)
                if update is None or not update.has_weight or path in merged:
                    continue
                up, down = update.factors()
                rank = down.shape[0]
                layer.lora_A[slot].weight[:rank].copy_(down)
                layer.lora_B[slot].weight[:, :rank].copy_(up * scale)
        biases = {path: u.bias for path, u in updates.items() if u.bias is not None}
        self.patches.add(slot, biases, merged, norms)
        self.patch_scales[slot] = scale
        self.patches.apply(self.patch_scales)

    def _clear(self, slot: str) -> None:
        for layer in self.layers.values():
            self._zero(layer, slot)
        self.patches.remove(slot)
        self.patches.apply(self.patch_scales)
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


def best_of_rank(update: Update, rank: int, device: torch.device | None = None) -> tuple[Update, float]:
    """The closest update of rank `rank` to `update` (truncated SVD; of low-rank factors through
    their QR factors, so the dense product is never formed), and its error relative to the
    update, in the Frobenius norm."""
    if update.dense is not None:
        u, s, vh = torch.linalg.svd(update.product(device), full_matrices=False)
    else:
        q_up, r_up = torch.linalg.qr(update.up.to(device).float())
        q_down, r_down = torch.linalg.qr(update.down.to(device).float().T)
        u, s, vh = torch.linalg.svd(r_up @ r_down.T)
        u, vh = q_up @ u, vh @ q_down.T
    energy = s.square()
    total = float(energy.sum())
    error = (max(total - float(energy[:rank].sum()), 0.0) / total) ** 0.5 if total > 0 else 0.0
    return Update(u[:, :rank] * s[:rank], vh[:rank], update.bias, update.kinds), error
