"""One layer's update, whatever adapter type it came from: `delta W = up @ down` (the file's
scale folded into `up`) or, where that is smaller, the dense `delta W`; and a bias update. Also
which role each tensor of a file plays, read from the end of its key.

`flux_lora.lora.formulas` builds an Update from each adapter type's definition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flux_lora.errors import InputError

# A tensor's role in its module, by the end of its key; longest first.
ROLES = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_B.default.bias", "up_bias"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".down.weight", "down"),  # XLabs
    (".up.weight", "up"),
    (".lora_magnitude_vector", "dora"),
    (".dora_scale", "dora"),
    (".alpha", "alpha"),
    *(
        (f".{name}", name)
        for name in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_w1", "lokr_w2")
    ),
    *((f".{name}", name) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
    (".lokr_t2", "tucker"),
    (".hada_t1", "tucker"),
    (".hada_t2", "tucker"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".w_norm", "diff"),  # LyCORIS's "norm" algorithm: a norm weight's difference
    (".b_norm", "diff_b"),
)
LORA, LOHA, LOKR = "LoRA", "LyCORIS LoHa", "LyCORIS LoKr"
WEIGHT_DIFF, BIAS_DIFF, DORA, NORM_DIFF = "weight difference", "bias difference", "DoRA", "norm difference"


def split_key(key: str) -> tuple[str, str] | None:
    """`(module, role)` of a tensor's key, or None for a key of no role we know."""
    for suffix, role in ROLES:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass(frozen=True)
class Update:
    """One layer's update: delta W = up @ down (low rank) or `dense` (where that is smaller), and
    delta b = bias; any of them may be absent."""

    up: torch.Tensor | None  # out x rank, the file's scale folded in
    down: torch.Tensor | None  # rank x in
    bias: torch.Tensor | None  # out
    kinds: frozenset[str]
    dense: torch.Tensor | None = None  # out x in, in place of up and down

    @property
    def has_weight(self) -> bool:
        return self.dense is not None or self.down is not None

    @property
    def rank(self) -> int:
        """The rank of the weight update's form (a dense one: min(out, in)); 0 for none."""
        if self.dense is not None:
            return min(self.dense.shape)
        return 0 if self.down is None else self.down.shape[0]

    @property
    def out_features(self) -> int:
        return next(t for t in (self.dense, self.up, self.bias) if t is not None).shape[0]

    @property
    def in_features(self) -> int | None:
        weight = self.dense if self.dense is not None else self.down
        return None if weight is None else weight.shape[1]

    def product(self, device: torch.device | None = None) -> torch.Tensor:
        """delta W, dense, in float32."""
        if self.dense is not None:
            return self.dense.to(device).float()
        return self.up.to(device).float() @ self.down.to(device).float()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down), a dense update as itself times an identity (for peft layers and slots)."""
        if self.dense is None:
            return self.up, self.down
        out_features, in_features = self.dense.shape
        if out_features >= in_features:
            return self.dense, torch.eye(in_features, dtype=self.dense.dtype, device=self.dense.device)
        return torch.eye(out_features, dtype=self.dense.dtype, device=self.dense.device), self.dense

    def to(self, dtype: torch.dtype) -> Update:
        def cast(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(dtype)

        return Update(cast(self.up), cast(self.down), cast(self.bias), self.kinds, cast(self.dense))

    def rows(self, rows: slice | None, swap_halves: bool) -> Update:
        """The update of some rows of this layer (one part of a fused layer), with its two halves
        exchanged if asked. Rows of up @ down are rows of up; down is shared."""

        def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            if rows is not None:
                tensor = tensor[rows]
            return halves_swapped(tensor) if swap_halves else tensor

        return Update(take(self.up), self.down, take(self.bias), self.kinds, take(self.dense))

    def plus(self, other: Update) -> Update:
        """Both updates at once: low-rank parts side by side (ranks add), or the dense sum where
        either is dense; biases summed."""
        bias = (
            self.bias if other.bias is None else other.bias if self.bias is None else self.bias + other.bias
        )
        kinds = self.kinds | other.kinds
        if self.dense is not None or other.dense is not None:
            weights = [u.product() for u in (self, other) if u.has_weight]
            return Update(None, None, bias, kinds, sum(weights[1:], weights[0]))
        up = _cat([self.up, other.up], dim=1)
        down = _cat([self.down, other.down], dim=0)
        return (
            smaller_of(Update(up, down, bias, kinds)) if down is not None else Update(None, None, bias, kinds)
        )


def halves_swapped(tensor: torch.Tensor) -> torch.Tensor:
    """The two halves of a tensor's rows in the other order: BFL's final modulation is (shift,
    scale), diffusers' `norm_out.linear` (scale, shift)."""
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def dense_is_smaller(out_features: int, in_features: int, rank: int) -> bool:
    """Whether factors of this rank would hold more numbers than the dense update."""
    return rank * (out_features + in_features) > out_features * in_features


def smaller_of(update: Update) -> Update:
    """The low-rank form, or the dense update where that is smaller."""
    if dense_is_smaller(update.up.shape[0], update.down.shape[1], update.rank):
        return Update(None, None, update.bias, update.kinds, update.up @ update.down)
    return update


def dense_update(delta: torch.Tensor, *kinds: str) -> Update:
    return Update(None, None, None, frozenset(kinds), delta)


def matrix(t: dict[str, torch.Tensor], role: str, module: str, where: str) -> torch.Tensor:
    tensor = t[role]
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # a 1x1 convolution's weight is a matrix
        tensor = tensor.flatten(1)
    if tensor.ndim != 2:
        raise InputError(
            f"{where}: {module}'s {role} has shape {tuple(tensor.shape)}; FLUX's layers are linear, and "
            "take two-dimensional factors. Is it an adapter for FLUX.1?"
        )
    return tensor.float()


def inner(left: torch.Tensor, right: torch.Tensor, module: str, where: str) -> None:
    if left.shape[1] != right.shape[0]:
        raise InputError(
            f"{where}: the factors of {module} do not multiply ({tuple(left.shape)} and "
            f"{tuple(right.shape)}). Download it again, or ask its author for the complete file."
        )


def _cat(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present, dim=dim) if present else None
