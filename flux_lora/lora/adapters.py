"""LoRA adapters on a FLUX transformer: reading the common key formats, loading, scaling, swapping.

Formats: diffusers/peft keys with or without the `transformer.` prefix (the Replicate trainer
writes these), kohya/sd-scripts (`lora_unet_*`), ComfyUI/BFL `diffusion_model.*` with
`lora_down/lora_up` or `lora_A/lora_B`, and XLabs (`*.processor.*_lora*`). diffusers converts
most; BFL files with `lora_A/lora_B` it passes through unconverted, so we rename them to the
`lora_down/lora_up` form it does convert. LoRAs apply to the transformer only: text-encoder parts
(kohya `lora_te1_*`) are reported, not applied, because dev and schnell share their text encoders.
"""

from __future__ import annotations

import hashlib
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from flux_lora.errors import InputError
from flux_lora.lora.layouts import Layout, detect

log = logging.getLogger(__name__)

TEXT_ENCODER_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.")
PREFIX = "transformer."  # diffusers' prefix for transformer keys in a pipeline's LoRA
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


@dataclass(frozen=True)
class LoraWeights:
    state_dict: dict[str, torch.Tensor]  # transformer keys, without prefix
    network_alphas: dict[str, float] | None
    metadata: dict | None
    text_encoder_keys: int
    layout: Layout


def read_lora(path: str, label: str, display: str) -> LoraWeights:
    """The transformer part of a LoRA file in any supported format, in diffusers naming."""
    from diffusers import FluxPipeline
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        raw = load_file(path)
    except (SafetensorError, OSError) as err:  # verified when cached, but perhaps by older rules
        raise InputError(f"{label}: {display} could not be read as safetensors ({_first_line(err)})") from err
    if len(raw) > MAX_LORA_TENSORS:
        raise InputError(
            f"{label}: {display} holds {len(raw)} tensors; a FLUX.1 LoRA holds at most a few thousand "
            f"(this container reads up to {MAX_LORA_TENSORS}). Is it a LoRA?"
        )
    layout = detect(raw)
    if not layout.applied:
        raise InputError(
            f"{label}: {display} holds {layout.describe()}. This container applies LoRA adapters "
            "(lora_A/lora_B or lora_down/lora_up pairs) only, and would not apply this one as its "
            "trainer defines it, so it refuses it rather than load part of it. Use a LoRA version "
            "of the adapter."
        )
    source: str | dict[str, torch.Tensor] = path
    if any(".lora_A." in key for key in raw) and any(key.startswith("diffusion_model.") for key in raw):
        source = {_bfl_ab_to_updown(key): value for key, value in raw.items()}
    try:
        state_dict, alphas, metadata = FluxPipeline.lora_state_dict(
            source, return_alphas=True, return_lora_metadata=True
        )
    except (AssertionError, KeyError, ValueError, RuntimeError) as err:
        raise InputError(
            f"{label}: {display} could not be converted to FLUX.1's layout ({err.__class__.__name__}); "
            f"it looks like {layout.describe()}; its keys look like {_sample(raw)}. Is it a LoRA "
            "for FLUX.1 [dev] or [schnell]?"
        ) from err
    transformer: dict[str, torch.Tensor] = {}
    text_encoder_keys = 0
    for key, value in state_dict.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            text_encoder_keys += 1
        else:
            transformer[key.removeprefix(PREFIX)] = value
    if alphas:
        alphas = {
            k.removeprefix(PREFIX): v for k, v in alphas.items() if not k.startswith(TEXT_ENCODER_PREFIXES)
        }
    if transformer:  # none at all: the caller says so, after logging any text-encoder part
        _check_pairs(transformer, f"{label}: {display}")
    return LoraWeights(transformer, alphas or None, metadata, text_encoder_keys, layout)


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
            self.transformer.delete_adapters(list(stale.values()))
            for identity in stale:
                del self.loaded[identity]
        if not self.loaded:
            self.transformer.unload_lora()  # back to the pristine modules
        elapsed = time.perf_counter() - started
        if newly_loaded or stale:
            log.info("LoRA swap: %d loaded, %d unloaded in %.3f s", len(newly_loaded), len(stale), elapsed)
        return elapsed

    def _load(self, adapter: WantedAdapter, name: str) -> None:
        weights = read_lora(adapter.path, adapter.label, adapter.display)
        if weights.text_encoder_keys:
            log.info(
                "%s: %d text-encoder LoRA keys not applied (LoRAs apply to the transformer only)",
                adapter.label,
                weights.text_encoder_keys,
            )
        if not weights.state_dict:
            raise InputError(f"{adapter.label}: {adapter.display} has no weights for the FLUX transformer.")
        try:
            with warnings.catch_warnings():
                # peft warns whenever a second adapter joins the first: here that is the intent.
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                # With the `transformer.` prefix back on every key: diffusers reads network alphas
                # only under a prefix (with prefix=None it refuses them).
                self.transformer.load_lora_adapter(
                    _prefixed(weights.state_dict),
                    prefix=PREFIX.rstrip("."),
                    adapter_name=name,
                    network_alphas=_prefixed(weights.network_alphas) if weights.network_alphas else None,
                    metadata=weights.metadata,
                )
        except (RuntimeError, ValueError, KeyError, IndexError, TypeError) as err:
            raise InputError(
                f"{adapter.label}: {adapter.display} does not fit this FLUX transformer "
                f"({_first_line(err)}). Is it a LoRA for FLUX.1 [dev] or [schnell], not another model?"
            ) from err
        touched = self._modules_with(name)
        if not touched:
            raise InputError(
                f"{adapter.label}: no key of {adapter.display} matches a FLUX transformer layer "
                f"(its keys look like {_sample(weights.state_dict)}). Is it a LoRA for FLUX.1?"
            )
        log.info("%s: %s loaded into %d layers", adapter.label, adapter.display, touched)

    def _set_weights(self, weights: dict[str, float]) -> None:
        if weights:
            self.transformer.set_adapters(list(weights), weights=list(weights.values()))
        self.active = dict(weights)

    def _rollback(self, newly_loaded: list[str], loaded: dict[str, str], active: dict[str, float]) -> None:
        present = [name for name in newly_loaded if self._modules_with(name)]
        if present:
            self.transformer.delete_adapters(present)
        peft_config = getattr(self.transformer, "peft_config", {})
        for name in newly_loaded:  # a load that failed half-way may have left its config behind
            peft_config.pop(name, None)
        self.loaded = loaded
        self.active = {}
        if loaded:
            self._set_weights(active)
        elif getattr(self.transformer, "_hf_peft_config_loaded", False):
            self.transformer.unload_lora()

    def _modules_with(self, name: str) -> int:
        return sum(1 for module in self.transformer.modules() if name in getattr(module, "lora_A", {}))


def _check_pairs(state_dict: dict[str, torch.Tensor], where: str) -> None:
    """Each layer's down (lora_A) and up (lora_B) matrices, both present: what peft and the
    compiled transformer's slots both need."""
    downs = {k.removesuffix(".lora_A.weight") for k in state_dict if k.endswith(".lora_A.weight")}
    ups = {k.removesuffix(".lora_B.weight") for k in state_dict if k.endswith(".lora_B.weight")}
    if not downs and not ups:
        raise InputError(
            f"{where} has no LoRA matrices for the FLUX transformer (its keys look like "
            f"{_sample(state_dict)}). Is it a LoRA for FLUX.1 [dev] or [schnell]?"
        )
    unpaired = sorted(downs ^ ups)
    if unpaired:
        raise InputError(
            f"{where} is not a whole LoRA: {len(unpaired)} layer(s) have only one of lora_A and lora_B "
            f"(e.g. {unpaired[0]}). Download it again, or ask its author for the complete file."
        )


def _prefixed(tensors: dict) -> dict:
    return {PREFIX + key: value for key, value in tensors.items()}


def adapter_name(identity: str) -> str:
    return "lora_" + hashlib.sha256(identity.encode()).hexdigest()[:12]


def _bfl_ab_to_updown(key: str) -> str:
    return key.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up.")


def _sample(state_dict: dict, count: int = 3) -> str:
    keys = sorted(state_dict)[:count]
    return ", ".join(keys) + (", ..." if len(state_dict) > count else "")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200] if str(err).strip() else err.__class__.__name__
