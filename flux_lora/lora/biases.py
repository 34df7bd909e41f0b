"""Bias updates (`.diff_b`, BFL's `lora_B.bias`), written into the layers' own biases with the
originals kept, so that removing them restores every bias bit for bit.

peft can carry a bias on lora_B, but not on the fp8 copy's layers (its torchao LoRA layer refuses
`lora_bias`), and the compiled graph must not change. A bias is a plain vector beside any weight,
fp8 or not: patching it in place serves the eager adapters, the slots and the fp8 copy alike.
"""

from __future__ import annotations

import torch

from flux_lora.errors import InputError


class BiasPatches:
    """Each owner's (an adapter's, or a slot's) bias updates on one transformer, applied at the
    owners' current weights."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.updates: dict[str, dict[str, torch.Tensor]] = {}  # owner -> module -> update, fp32
        self.original: dict[str, torch.Tensor] = {}  # module -> its bias before any update

    def check(self, modules: list[str], where: str) -> None:
        """Raises InputError, changing nothing, if any of `modules` has no bias to update."""
        for module in modules:
            if self._layer(module).bias is None:
                raise InputError(
                    f"{where} updates the bias of {module}, which has none. Is it an adapter for FLUX.1?"
                )

    def add(self, owner: str, updates: dict[str, torch.Tensor]) -> None:
        """Holds `owner`'s updates, in place of any it had; they take effect at the next `apply`."""
        self.updates.pop(owner, None)
        if updates:
            self.updates[owner] = {module: update.float() for module, update in updates.items()}

    def remove(self, owner: str) -> None:
        self.updates.pop(owner, None)

    def apply(self, weights: dict[str, float]) -> None:
        """Every patched bias = its original + the sum of each owner's update times its weight
        (owners not in `weights` count 0); a bias no owner updates any more gets its original back."""
        wanted: dict[str, torch.Tensor] = {}
        for owner, updates in self.updates.items():
            weight = weights.get(owner, 0.0)
            for module, update in updates.items():
                wanted[module] = wanted.get(module, torch.zeros_like(update)) + weight * update
        with torch.no_grad():
            for module in list(self.original):
                if module not in wanted:
                    self._bias(module).copy_(self.original.pop(module))
            for module, total in wanted.items():
                bias = self._bias(module)
                original = self.original.setdefault(module, bias.detach().clone())
                if not total.any():
                    bias.copy_(original)  # weight 0: exactly the original, not original + 0.0
                else:
                    bias.copy_((original.float() + total.to(original.device)).to(original.dtype))

    def _bias(self, module: str) -> torch.Tensor:
        return self._layer(module).bias

    def _layer(self, module: str) -> torch.nn.Module:
        layer = self.transformer.get_submodule(module)
        return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
