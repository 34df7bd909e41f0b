"""Each adapter type's update to one linear layer, as its trainer defines it, in one exact form
(`flux_lora.lora.updates.Update`): `delta W = up @ down` with the file's own scale folded into
`up`, or the dense `delta W`, and an optional bias update.

Every type FLUX adapters are published in has such a form, with no approximation:
- LoRA (kohya, peft, BFL, ...): up @ down, scaled by alpha / rank when the file gives an alpha.
- LyCORIS LoHa: (w1a @ w1b) * (w2a @ w2b), elementwise, scaled by alpha / rank. That is exactly a
  LoRA of rank r1 * r2 whose columns and rows are the pairwise products of the factors' own.
- LyCORIS LoKr: kron(W1, W2), each factor whole or a product of two. With W1 = U1 @ V1 and
  W2 = U2 @ V2, kron(W1, W2) = kron(U1, U2) @ kron(V1, V2) (the mixed-product rule), a LoRA of
  rank rank(W1) * rank(W2). Scale alpha / rank when a factor is decomposed, 1 when both are whole
  (LyCORIS ignores the stored alpha then).
- A weight difference (`.diff`): the difference itself, dense.
- A bias difference (`.diff_b`, or `lora_B.bias` as BFL's control LoRAs and peft write it).
- DoRA (a magnitude `m` beside any of the above): the layer becomes V = W + delta W with each row
  (or column) rescaled to norm m. Strength is ComfyUI's linear one, W(s) = W + s (W_dora - W), so
  scale 0 is the base exactly: the update is the dense W_dora - W, computed from the layer's own
  weight. (peft puts the scale inside the norm: not linear, and scale 0 is not the base.)
Where factors would hold more numbers than the dense update (a full-rank LoKr or LoHa), the dense
update is kept instead: still exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from flux_lora.errors import InputError
from flux_lora.lora.updates import (
    BIAS_DIFF,
    DORA,
    LOHA,
    LOKR,
    LORA,
    WEIGHT_DIFF,
    Update,
    dense_is_smaller,
    dense_update,
    inner,
    matrix,
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
        found.append(dense_update(diff, WEIGHT_DIFF))
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
        up, down = matrix(t, "up", module, where), matrix(t, "down", module, where)
        inner(up, down, module, where)
        if alpha is not None:
            scale = alpha / down.shape[0]
        up = up * scale
    bias = t["up_bias"].float().flatten() * scale if "up_bias" in t else None
    return Update(up, down, bias, frozenset({LORA}))


def _loha(module: str, t: dict[str, torch.Tensor], alpha: float | None, where: str) -> Update:
    w1a, w1b, w2a, w2b = (
        matrix(t, name, module, where) for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    )
    inner(w1a, w1b, module, where)
    inner(w2a, w2b, module, where)
    if w1a.shape[0] != w2a.shape[0] or w1b.shape[1] != w2b.shape[1]:
        raise InputError(f"{where}: the LoHa factors of {module} describe two different layer shapes")
    scale = alpha / w1b.shape[0] if alpha is not None else 1.0
    r1, r2 = w1b.shape[0], w2b.shape[0]
    out_features, in_features = w1a.shape[0], w1b.shape[1]
    if dense_is_smaller(out_features, in_features, r1 * r2):
        return dense_update(scale * (w1a @ w1b) * (w2a @ w2b), LOHA)
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
            factors.append((matrix(t, whole, module, where), None))
        elif a in t and b in t and whole not in t:
            left, right = matrix(t, a, module, where), matrix(t, b, module, where)
            inner(left, right, module, where)
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
    if dense_is_smaller(out_features, in_features, r1.shape[0] * r2.shape[0]):
        whole = [u if v is None else u @ v for u, v in factors]
        return dense_update(scale * torch.kron(whole[0], whole[1]), LOKR)
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
