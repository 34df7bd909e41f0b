"""Each adapter type's update to one linear layer, as its trainer defines it, in one exact form:
`delta W = up @ down` (the file's own scale folded into `up`) and an optional bias update.

Every type FLUX adapters are published in has such a form, with no approximation:
- LoRA (kohya, peft, BFL, ...): up @ down, scaled by alpha / rank when the file gives an alpha.
- LyCORIS LoHa: (w1a @ w1b) * (w2a @ w2b), elementwise, scaled by alpha / rank. That is exactly a
  LoRA of rank r1 * r2 whose columns and rows are the pairwise products of the factors' own.
- LyCORIS LoKr: kron(W1, W2), each factor whole or a product of two. With W1 = U1 @ V1 and
  W2 = U2 @ V2, kron(W1, W2) = kron(U1, U2) @ kron(V1, V2) (the mixed-product rule), a LoRA of
  rank rank(W1) * rank(W2). Scale alpha / rank when a factor is decomposed, 1 when both are whole
  (LyCORIS ignores the stored alpha then).
- A weight difference (`.diff`): the difference itself, as `up` with an identity `down` (or the
  reverse, whichever is smaller).
- A bias difference (`.diff_b`, or `lora_B.bias` as BFL's control LoRAs and peft write it).
- DoRA (a magnitude `m` beside any of the above): the layer becomes V = W + delta W with each row
  (or column) rescaled to norm m. Strength is ComfyUI's linear one, W(s) = W + s (W_dora - W), so
  scale 0 is the base exactly: the update is the dense W_dora - W, computed from the layer's own
  weight. (peft puts the scale inside the norm: not linear, and scale 0 is not the base.)
Where the low-rank form would be larger than the dense difference (a full-rank LoKr), the dense
difference is used: rank min(out, in), still exact.
"""

from __future__ import annotations

from collections.abc import Callable
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
    def dense_is_smaller(self) -> bool:
        """Whether the dense update (out x in) takes less memory, and a matrix product less work,
        than factors would: a full-rank LoKr, DoRA, a `.diff`."""
        return self.dense is not None

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
            if swap_halves:
                first, second = tensor.chunk(2, dim=0)
                tensor = torch.cat([second, first], dim=0)
            return tensor

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
            _smaller_of(Update(up, down, bias, kinds))
            if down is not None
            else Update(None, None, bias, kinds)
        )


def update_of(
    module: str,
    tensors: dict[str, torch.Tensor],
    lora_scale: float | None,
    where: str,
    base_weight: Callable[[], torch.Tensor] | None = None,
) -> Update:
    """The update one module's tensors define. `lora_scale` is a LoRA's scale from the file's
    peft metadata, when it has some and no `.alpha` for this module. `base_weight` gives the
    layer's weight (float32), which only DoRA needs."""
    roles = set(tensors)
    if "tucker" in roles:
        raise InputError(
            f"{where} holds LyCORIS Tucker factors (lokr_t2 / hada_t1, at {module}), which only "
            "convolutions have; FLUX's transformer has none. Is it an adapter for FLUX.1?"
        )
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    if alpha == 0.0:  # sd-scripts and LyCORIS read an alpha of 0 as none: scale 1
        alpha = None
    found: list[Update] = []
    if roles & {"up", "down", "up_bias"}:
        found.append(_lora(module, tensors, alpha, lora_scale, where))
    if roles & {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}:
        found.append(_loha(module, tensors, alpha, where))
    if roles & {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"}:
        found.append(_lokr(module, tensors, alpha, where))
    if "diff" in roles:
        diff = tensors["diff"].float()
        if diff.ndim != 2:
            raise InputError(
                f"{where}: {module}.diff has shape {tuple(diff.shape)}; a linear layer's weight "
                "difference has two dimensions. Is it an adapter for FLUX.1?"
            )
        found.append(_dense(diff, WEIGHT_DIFF))
    if "diff_b" in roles:
        found.append(Update(None, None, tensors["diff_b"].float().flatten(), frozenset({BIAS_DIFF})))
    if not found:
        present = " and ".join(
            sorted({"dora": "a DoRA magnitude", "alpha": "an alpha"}[role] for role in roles)
        )
        raise InputError(
            f"{where}: {module} has {present} and no update (LoRA, LoKr, LoHa or difference) to apply "
            "it to. Download it again, or ask its author for the complete file."
        )
    update = found[0]
    for other in found[1:]:
        update = update.plus(other)
    if "dora" in roles:
        if not update.has_weight or base_weight is None:
            raise InputError(
                f"{where}: {module} has a DoRA magnitude and no update to the weight to normalise."
            )
        update = _dora(update, tensors["dora"].float(), base_weight(), module, where)
    return update


def _dora(update: Update, magnitude: torch.Tensor, weight: torch.Tensor, module: str, where: str) -> Update:
    """W_dora - W for V = W + up @ down: rows of V rescaled to norms `magnitude` when it has one
    value per output ((out,) as peft writes it, (out, 1) as LyCORIS), columns when per input
    ((1, in), older LyCORIS and OneTrainer). Norms in float32, LyCORIS's epsilon added."""
    out_features, in_features = weight.shape
    if (update.out_features, update.in_features) != (out_features, in_features):
        raise InputError(
            f"{where}: {module} updates a {update.out_features} x {update.in_features} weight, and the "
            f"layer is {out_features} x {in_features}. Is it a LoRA for FLUX.1 [dev] or [schnell], not another model?"
        )
    eps = torch.finfo(torch.float32).eps
    adapted = weight + update.product(weight.device)
    if magnitude.numel() == out_features and (magnitude.ndim == 1 or magnitude.shape[-1] == 1):
        rows = magnitude.reshape(out_features, 1).to(weight.device) / (
            adapted.norm(dim=1, keepdim=True) + eps
        )
        dora = rows * adapted
    elif magnitude.numel() == in_features:
        columns = magnitude.reshape(1, in_features).to(weight.device) / (
            adapted.norm(dim=0, keepdim=True) + eps
        )
        dora = adapted * columns
    else:
        raise InputError(
            f"{where}: {module}'s DoRA magnitude has shape {tuple(magnitude.shape)}, neither one value per "
            f"output ({out_features}) nor per input ({in_features}) of a {out_features} x {in_features} layer."
        )
    return Update(None, None, update.bias, update.kinds | {DORA}, dora - weight)


def _lora(
    module: str, t: dict[str, torch.Tensor], alpha: float | None, lora_scale: float | None, where: str
) -> Update:
    if ("up" in t) != ("down" in t):
        have, lacks = ("up", "down") if "up" in t else ("down", "up")
        raise InputError(
            f"{where} is not a whole LoRA: {module} has its {have} matrix and not its {lacks} matrix. "
            "Download it again, or ask its author for the complete file."
        )
    scale = lora_scale if lora_scale is not None else 1.0
    up = down = None
    if "up" in t:
        up, down = _matrix(t, "up", module, where), _matrix(t, "down", module, where)
        _inner(up, down, module, where)
        if alpha is not None:
            scale = alpha / down.shape[0]
        up = up * scale
    bias = t["up_bias"].float().flatten() * scale if "up_bias" in t else None
    return Update(up, down, bias, frozenset({LORA}))


def _loha(module: str, t: dict[str, torch.Tensor], alpha: float | None, where: str) -> Update:
    w1a, w1b, w2a, w2b = (
        _matrix(t, name, module, where) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    )
    _inner(w1a, w1b, module, where)
    _inner(w2a, w2b, module, where)
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
        raise InputError(f"{where}: the LoHa factors of {module} describe two different layer shapes")
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    r1, r2 = w1b.shape[0], w2b.shape[0]
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    if _dense_is_smaller(out_features, in_features, r1 * r2):
        return _dense(scale * (w1a @ w1b) * (w2a @ w2b), LOHA)
    # (w1a @ w1b) * (w2a @ w2b) = up @ down with up[:, i*r2 + j] = w1a[:, i] * w2a[:, j] and
    # down[i*r2 + j, :] = w1b[i] * w2b[j].
    up = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_features, r1 * r2) * scale
    down = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, in_features)
    return Update(up, down, None, frozenset({LOHA}))


def _lokr(module: str, t: dict[str, torch.Tensor], alpha: float | None, where: str) -> Update:
    factors = []
    for side in ("w1", "w2"):
        whole, a, b = f"lokr_{side}", f"lokr_{side}_a", f"lokr_{side}_b"
        if whole in t and a not in t and b not in t:
            factors.append((_matrix(t, whole, module, where), None))
        elif a in t and b in t and whole not in t:
            left, right = _matrix(t, a, module, where), _matrix(t, b, module, where)
            _inner(left, right, module, where)
            factors.append((left, right))
        else:
            have = ", ".join(sorted(k for k in t if k.startswith("lokr_" + side))) or "none of them"
            raise InputError(
                f"{where} is not a whole LoKr: {module} needs lokr_{side}, or lokr_{side}_a and "
                f"lokr_{side}_b; it has {have}."
            )
    (_, v1), (_, v2) = factors
    # LyCORIS: alpha / rank with the rank of the decomposed factor (W2's first), 1 when neither is.
    rank = v2.shape[0] if v2 is not None else v1.shape[0] if v1 is not None else None
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    (l1, r1), (l2, r2) = (_as_product(u, v) for u, v in factors)
    out_features, in_features = l1.shape[0] * l2.shape[0], r1.shape[1] * r2.shape[1]
    if _dense_is_smaller(out_features, in_features, r1.shape[0] * r2.shape[0]):
        whole = [u if v is None else u @ v for u, v in factors]
        return _dense(scale * torch.kron(whole[0], whole[1]), LOKR)
    return Update(torch.kron(l1, l2) * scale, torch.kron(r1, r2), None, frozenset({LOKR}))


def _as_product(left: torch.Tensor, right: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A factor as (left, right) with left @ right = it: a whole one times an identity on the
    side where the identity is smaller."""
    if right is not None:
        return left, right
    rows, cols = left.shape
    if rows <= cols:
        return torch.eye(rows, device=left.device), left
    return left, torch.eye(cols, device=left.device)


def _dense_is_smaller(out_features: int, in_features: int, rank: int) -> bool:
    """Whether factors of this rank would hold more numbers than the dense update."""
    return rank * (out_features + in_features) > out_features * in_features


def _smaller_of(update: Update) -> Update:
    """The low-rank form, or the dense update where that is smaller."""
    if _dense_is_smaller(update.up.shape[0], update.down.shape[1], update.rank):
        return Update(None, None, update.bias, update.kinds, update.up @ update.down)
    return update


def _dense(delta: torch.Tensor, *kinds: str) -> Update:
    return Update(None, None, None, frozenset(kinds), delta)


def _matrix(t: dict[str, torch.Tensor], role: str, module: str, where: str) -> torch.Tensor:
    tensor = t[role]
    if tensor.ndim == 4 and tensor.shape[2:] == (1, 1):  # a 1x1 convolution's weight is a matrix
        tensor = tensor.flatten(1)
    if tensor.ndim != 2:
        raise InputError(
            f"{where}: {module}'s {role} has shape {tuple(tensor.shape)}; FLUX's layers are linear, and "
            "take two-dimensional factors. Is it an adapter for FLUX.1?"
        )
    return tensor.float()


def _inner(left: torch.Tensor, right: torch.Tensor, module: str, where: str) -> None:
    if left.shape[1] != right.shape[0]:
        raise InputError(
            f"{where}: the factors of {module} do not multiply ({tuple(left.shape)} and "
            f"{tuple(right.shape)}). Download it again, or ask its author for the complete file."
        )


def _cat(tensors: list[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    present = [t for t in tensors if t is not None]
    return torch.cat(present, dim=dim) if present else None
