"""Updates written into the layers' own parameters, with the originals kept so that removing them
restores every parameter bit for bit: bias updates always; weight updates whose dense form is
smaller than their factors (eager: no second matrix product in every forward); and on a compiled
transformer, the weight updates its LoRA slots are too small for.

peft can carry a bias on lora_B, but not on the fp8 copy's layers (its torchao LoRA layer refuses
`lora_bias`), and a compiled graph must not change. A bias is a plain vector beside any weight,
fp8 or not; a bf16 weight is a plain matrix. Writing either in place changes no module, shape or
dtype, so no compiled guard fails.
"""

from __future__ import annotations

import torch

from flux_lora.lora.names import base_layer, quantized
from flux_lora.lora.updates import Update

WEIGHT, BIAS = "weight", "bias"


class ParameterPatches:
    """Each owner's (an adapter's, or a slot's) updates to parameters of one transformer, applied
    at the owners' current weights."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        # owner -> (module, parameter name) -> its update
        self.updates: dict[str, dict[tuple[str, str], torch.Tensor | Update]] = {}
        # (module, parameter name) -> its value before any update
        self.original: dict[tuple[str, str], torch.Tensor] = {}

    def original_weight(self, module: str) -> torch.Tensor | None:
        """A layer's weight as it was before any update written into it, or None if none is."""
        return self.original.get((module, WEIGHT))

    def mergeable(self, module: str) -> bool:
        """Whether a weight update can be written into this layer's weight: a plain tensor, not an
        fp8 one (which would need quantizing again at every swap)."""
        return not quantized(self._layer(module).weight)

    def add(
        self,
        owner: str,
        biases: dict[str, torch.Tensor],
        weights: dict[str, Update] | None = None,
        norms: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Holds `owner`'s updates (to linear layers' biases and weights, and to norms' weights), in
        place of any it had; they take effect at the next `apply`."""
        self.updates.pop(owner, None)
        held: dict[tuple[str, str], torch.Tensor | Update] = {(m, BIAS): b.float() for m, b in biases.items()}
        held |= {(m, WEIGHT): self._stored(m, update) for m, update in (weights or {}).items()}
        held |= {(m, WEIGHT): difference.float() for m, difference in (norms or {}).items()}
        if held:
            self.updates[owner] = held

    def remove(self, owner: str) -> None:
        self.updates.pop(owner, None)

    def apply(self, weights: dict[str, float]) -> None:
        """Every patched parameter = its original + the sum of each owner's update times its weight
        (owners not in `weights` count 0); one no owner updates any more gets its original back."""
        wanted: dict[tuple[str, str], list[tuple[float, torch.Tensor | Update]]] = {}
        for owner, updates in self.updates.items():
            for key, update in updates.items():
                wanted.setdefault(key, []).append((weights.get(owner, 0.0), update))
        with torch.no_grad():
            for key in list(self.original):
                if key not in wanted:
                    self._parameter(key).copy_(self.original.pop(key))
            for key, terms in wanted.items():
                parameter = self._parameter(key)
                if key not in self.original:
                    self.original[key] = parameter.detach().clone()
                original = self.original[key]
                terms = [(weight, update) for weight, update in terms if weight != 0.0]
                if not terms:
                    parameter.copy_(original)  # weight 0: exactly the original, not original + 0.0
                    continue
                total = original.float()
                for weight, update in terms:
                    total = total + weight * _dense(update, original.device)
                parameter.copy_(total.to(original.dtype))

    def _stored(self, module: str, update: Update) -> torch.Tensor | Update:
        """A weight update as kept until removed: its factors, or where they are larger than the
        weight (a full-rank LoKr, DoRA, a `.diff`), the dense update in the weight's own dtype and
        device (no more memory than the original it is kept beside)."""
        if update.dense is None:
            return update
        weight = self._layer(module).weight
        return _dense(update, weight.device).to(weight.dtype)

    def _parameter(self, key: tuple[str, str]) -> torch.Tensor:
        module, name = key
        return getattr(self._layer(module), name)

    def _layer(self, module: str) -> torch.nn.Module:
        return base_layer(self.transformer, module)


def _dense(update: torch.Tensor | Update, device: torch.device) -> torch.Tensor:
    if isinstance(update, Update):
        return update.product(device)
    return update.to(device).float()
