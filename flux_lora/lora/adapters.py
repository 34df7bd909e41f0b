"""LoRA adapters on a FLUX transformer: reading a file in any supported layout, loading,
scaling, swapping.

A file is read by our own converter (`flux_lora.lora.convert`): every layout and adapter type it
knows becomes one exact low-rank update per layer, in diffusers' names, with the file's scales
folded in. Each update loads as a peft LoRA layer of its own rank at scale 1, so one mechanism
serves every format and the request's scale is a plain linear weight; bias updates, and dense
updates on plain (not fp8) weights, are written into the parameters with the originals kept
(`flux_lora.lora.patches`). Text-encoder parts are reported, not applied, because dev and
schnell share their text encoders.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from flux_lora.errors import InputError
from flux_lora.lora.convert import Converted, convert
from flux_lora.lora.names import ModuleNames
from flux_lora.lora.patches import ParameterPatches
from flux_lora.lora.updates import Update

log = logging.getLogger(__name__)

MAX_LORA_TENSORS = 20_000
GO_FAST_SCALE = 1.5  # the schema's documented multiplier for both LoRA scales under go_fast


def already_in_place(wanted: list[WantedAdapter], multiplier: float = 1.0) -> str:
    """The log line for a request whose LoRAs are already in place: by the previous request, or
    at setup (COG_WEIGHTS)."""
    held = ", ".join(f"{a.label} ({a.display}) at scale {a.scale * multiplier:g}" for a in wanted)
    return f"LoRA: {held}, already in place: nothing to load"


@dataclass(frozen=True)
class WantedAdapter:
    """One adapter a request asks for: where its file is, what it is, and how strong."""

    identity: str  # secret-free identity of the weights (the cache's)
    path: str
    scale: float
    label: str  # the input it came from, for messages: "replicate_weights", "extra_lora", ...
    display: str  # the redacted reference


def read_lora(path: str, label: str, display: str, names: ModuleNames) -> Converted:
    """A LoRA file's updates to the transformer `names` describes; raises InputError for a file
    that cannot be read, or applied whole."""
    from safetensors import SafetensorError, safe_open

    where = f"{label}: {display}"
    try:
        with safe_open(path, framework="pt") as file:
            keys = list(file.keys())
            if len(keys) > MAX_LORA_TENSORS:
                raise InputError(
                    f"{where} holds {len(keys)} tensors; a FLUX.1 LoRA holds at most a few thousand "
                    f"(this container reads up to {MAX_LORA_TENSORS}). Is it a LoRA?"
                )
            header = file.metadata()
            tensors = {key: file.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as err:  # verified when cached, but perhaps by older rules
        raise InputError(f"{where} could not be read as safetensors ({_first_line(err)})") from err
    converted = convert(tensors, header, names, where)
    if converted.text_encoders:
        parts = ", ".join(f"{len(keys)} {encoder}" for encoder, keys in converted.text_encoders.items())
        log.info(
            "%s: text-encoder tensors not applied (LoRAs apply to the transformer only): %s", label, parts
        )
    if converted.skipped:
        log.info(
            "%s: %d layers not applied: this transformer has no %s (FLUX.1 [schnell] takes no guidance)",
            label,
            len(converted.skipped),
            ", ".join(converted.skipped),
        )
    if not converted.updates and not converted.norms:
        raise InputError(f"{where} has no weights for the FLUX transformer ({converted.describe()}).")
    return converted


def peft_adapter(updates: dict[str, Update], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict]:
    """The peft LoRA state dict and config for the low-rank part of `updates`: each layer at its
    own rank and scale 1 (alpha = rank), in the transformer's dtype. Biases are `ParameterPatches`'."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for module, update in updates.items():
        up, down = update.factors()
        state[f"{module}.lora_A.weight"] = down.to(dtype)
        state[f"{module}.lora_B.weight"] = up.to(dtype)
        ranks[module] = update.rank
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {"^" + re.escape(module): r for module, r in ranks.items() if r != rank}
    config = {
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": "(" + "|".join(re.escape(module) for module in ranks) + ")",
    }
    return state, config


def no_stop() -> None:
    """The `check` of a load nothing can stop."""


class TransformerAdapters(Protocol):
    """LoRAs on one transformer: `AdapterSet` (peft adapters, any rank, eager) or `LoraSlots`
    (fixed slots a compiled graph reads). Either makes `wanted` current, or changes nothing and
    raises InputError."""

    def activate(
        self, wanted: list[WantedAdapter], multiplier: float = 1.0, check: Callable[[], None] = no_stop
    ) -> float:
        """Returns the seconds spent loading (0.0 when nothing changed). `check` raises to stop the
        load (a cancel or a limit); it is called between LoRAs, and what was loaded is rolled back."""
        ...


class AdapterSet:
    """The adapters of one transformer. `activate` makes a wanted set current: unchanged adapters
    are kept, changed ones swapped, unwanted ones deleted, and a failure rolls everything back."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.names = ModuleNames.of(transformer)
        self.patches = ParameterPatches(transformer)
        self.names.pristine = self.patches.original_weight  # DoRA normalises the weight as loaded
        self.loaded: dict[str, str] = {}  # identity -> adapter name
        self.active: dict[str, float] = {}  # adapter name -> weight, as last set

    def activate(
        self, wanted: list[WantedAdapter], multiplier: float = 1.0, check: Callable[[], None] = no_stop
    ) -> float:
        """Returns the seconds spent loading (0.0 when nothing changed)."""
        weights: dict[str, float] = {}
        for adapter in wanted:  # the same LoRA twice: one adapter, scales added (linear)
            name = adapter_name(adapter.identity)
            weights[name] = weights.get(name, 0.0) + adapter.scale * multiplier
        if weights == self.active and all(adapter_name(a.identity) in self.loaded.values() for a in wanted):
            if wanted:
                log.info("%s", already_in_place(wanted, multiplier))
            return 0.0

        started = time.perf_counter()
        before_loaded, before_active = dict(self.loaded), dict(self.active)
        newly_loaded: list[str] = []
        try:
            for adapter in wanted:
                if adapter.identity not in self.loaded:
                    name = adapter_name(adapter.identity)
                    if name not in newly_loaded:
                        check()
                        self._load(adapter, name)
                        newly_loaded.append(name)
                    self.loaded[adapter.identity] = name
            check()
            self._set_weights(weights)
        except Exception:
            self._rollback(newly_loaded, before_loaded, before_active)
            raise
        wanted_names = set(weights)
        stale = {identity: name for identity, name in self.loaded.items() if name not in wanted_names}
        if stale:
            self._delete(list(stale.values()))
            for identity in stale:
                del self.loaded[identity]
            self.patches.apply(self.active)
        if not self.loaded:
            self.transformer.unload_lora()  # back to the pristine modules
        elapsed = time.perf_counter() - started
        if newly_loaded or stale:
            log.info("LoRA swap: %d loaded, %d unloaded in %.3f s", len(newly_loaded), len(stale), elapsed)
        return elapsed

    def _load(self, adapter: WantedAdapter, name: str) -> None:
        converted = read_lora(adapter.path, adapter.label, adapter.display, self.names)
        # A dense update (a full-rank LoKr, DoRA, a .diff) goes into a plain weight: as a LoRA it
        # would cost two full-size products in every forward. fp8 weights cannot take it.
        merged = {
            module: update
            for module, update in converted.updates.items()
            if update.dense is not None and self.patches.mergeable(module)
        }
        low_rank = {
            module: update
            for module, update in converted.updates.items()
            if update.has_weight and module not in merged
        }
        biases = {
            module: update.bias for module, update in converted.updates.items() if update.bias is not None
        }
        if low_rank:
            self._load_low_rank(adapter, name, low_rank)
        self.patches.add(name, biases, merged, converted.norms)
        details = [" + ".join(sorted(converted.kinds))]
        details += [f"rank {_ranks(low_rank)}"] if low_rank else []
        details += [f"{len(merged)} dense updates written into the weights"] if merged else []
        details += [f"{len(biases)} bias updates"] if biases else []
        details += [f"{len(converted.norms)} norm differences"] if converted.norms else []
        log.info(
            "%s: %s loaded into %d layers (%s)",
            adapter.label,
            adapter.display,
            len(converted.updates) + len(converted.norms),
            ", ".join(details),
        )

    def _load_low_rank(self, adapter: WantedAdapter, name: str, updates: dict[str, Update]) -> None:
        state, config = peft_adapter(updates, self.transformer.dtype)
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins the first: here that is the intent.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # On the fp8 copy: peft says its layers cannot merge; adapters are never merged here.
                warnings.filterwarnings("ignore", message="TorchaoLoraLinear was instantiated without")
                self.transformer.load_lora_adapter(state, prefix=None, adapter_name=name, metadata=config)
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:
            raise InputError(
                f"{adapter.label}: {adapter.display} does not fit this FLUX transformer "
                f"({_first_line(err)}). Is it a LoRA for FLUX.1 [dev] or [schnell], not another model?"
            ) from err
        touched = self._modules_with(name)
        if touched != len(updates):  # every layer is named exactly: a miss is our fault
            raise InputError(
                f"{adapter.label}: {adapter.display} reached {touched} of the {len(updates)} layers it "
                "updates; refusing it rather than apply part of it."
            )

    def _set_weights(self, weights: dict[str, float]) -> None:
        in_peft = [name for name in weights if name in self._peft_adapters()]
        if in_peft:
            self.transformer.set_adapters(in_peft, weights=[weights[name] for name in in_peft])
        self.patches.apply(weights)
        self.active = dict(weights)

    def _delete(self, names: list[str]) -> None:
        """Removes these adapters, low-rank parts and bias updates; the biases are rewritten by
        the next `_set_weights`."""
        in_peft = [name for name in names if name in self._peft_adapters()]
        if in_peft:
            self.transformer.delete_adapters(in_peft)
        for name in names:
            self.patches.remove(name)

    def _rollback(self, newly_loaded: list[str], loaded: dict[str, str], active: dict[str, float]) -> None:
        self._delete([name for name in newly_loaded if self._modules_with(name)])
        peft_config = getattr(self.transformer, "peft_config", {})
        for name in newly_loaded:  # a load that failed half-way may have left its config behind
            peft_config.pop(name, None)
            self.patches.remove(name)
        self.loaded = loaded
        self._set_weights(active if loaded else {})
        if not loaded and getattr(self.transformer, "_hf_peft_config_loaded", False):
            self.transformer.unload_lora()

    def _peft_adapters(self) -> dict:
        return getattr(self.transformer, "peft_config", None) or {}

    def _modules_with(self, name: str) -> int:
        return sum(1 for module in self.transformer.modules() if name in getattr(module, "lora_A", {}))


def adapter_name(identity: str) -> str:
    return "lora_" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _ranks(updates: dict[str, Update]) -> str:
    """The ranks of a file's updates, e.g. "16" or "4-3072"."""
    ranks = sorted({update.rank for update in updates.values()})
    return str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
