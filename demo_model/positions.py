"""Which rotary channels the demo transformer's attention may read, so that it can draw at every size.

FLUX rotates each head's queries and keys by the tokens' positions (`FluxPosEmbed`): per position
axis, channel pairs turn at 1, 0.22, 0.046, ... radians per token (theta 10000). Text tokens sit at
position 0, so an image token's score against them tells it where it is. Trained at 8x8 tokens
only, the demo model read its place from the fastest pair, which turns a full circle every 6.3
tokens: on a 32x32 grid every 6.3 tokens look like the same place, and it drew the shape again at
each (tiles: demo/README.md). A pair that turns more than half a circle across the
longest grid the schema asks for (48 tokens: 1536 px) repeats or folds on it, so the sizes stage
trains without those pairs: their key channels are zero in every attention layer and their
gradients are held at zero, so the saved model has them zero too, and no score reads them. The
slow pairs are left: the rotation across the grid stays under half a circle, one place per angle.
"""

from __future__ import annotations

import math

import torch

from demo_model.architecture import PIXELS_PER_TOKEN
from flux_lora.schema import ASPECT_RATIOS

# The longest side of any preset at 1 megapixel (21:9's 1536 px), in packed tokens: 48.
LONGEST_SIDE_TOKENS = max(max(size) for size in ASPECT_RATIOS.values()) // PIXELS_PER_TOKEN
KEY_PROJECTIONS = ("to_k", "add_k_proj")  # image keys; text keys in the double blocks


def pair_frequencies(transformer) -> list[torch.Tensor]:
    """Radians per token of each axis' channel pairs, as FluxPosEmbed computes them."""
    theta = transformer.pos_embed.theta
    return [
        1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        for dim in transformer.pos_embed.axes_dim
    ]


def silent_channels(transformer, longest_side: int = LONGEST_SIDE_TOKENS) -> torch.Tensor:
    """A head-dimension mask: True on channels whose pair turns more than half a circle across
    `longest_side` tokens. The first axis is FLUX's frame index, 0 for every token: never rotated."""
    mask = []
    for axis, frequencies in enumerate(pair_frequencies(transformer)):
        for frequency in frequencies.tolist():
            silent = axis > 0 and frequency * (longest_side - 1) > math.pi
            mask += [silent, silent]
    return torch.tensor(mask)


def key_layers(transformer) -> list[torch.nn.Module]:
    """Every key projection of every attention layer (double and single blocks)."""
    layers = []
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        for name in KEY_PROJECTIONS:
            layer = getattr(block.attn, name, None)
            if layer is not None:
                layers.append(layer)
    return layers


def silence_fast_pairs(transformer, longest_side: int = LONGEST_SIDE_TOKENS) -> int:
    """Zero the key rows of the fast pairs' channels in every head, in the weights and biases and
    in any LoRA's up-projection on them, and hold their gradients at zero (AdamW then leaves them
    at zero). Returns the number of channels silenced per head."""
    rows = _silent_rows(transformer, longest_side)
    for layer in key_layers(transformer):
        for parameter in _row_parameters(layer):
            keep = (~rows).to(parameter.device, parameter.dtype)
            keep = keep.view(-1, *([1] * (parameter.dim() - 1)))
            with torch.no_grad():
                parameter.mul_(keep)
            if parameter.requires_grad:
                parameter.register_hook(lambda grad, keep=keep: grad * keep)
    return int(silent_channels(transformer, longest_side).sum())


def silenced_rows_are_zero(transformer, longest_side: int = LONGEST_SIDE_TOKENS) -> bool:
    """Whether every key projection (and LoRA on one) carries nothing on the fast pairs."""
    rows = _silent_rows(transformer, longest_side)
    return all(
        bool((parameter[rows.to(parameter.device)] == 0).all())
        for layer in key_layers(transformer)
        for parameter in _row_parameters(layer)
    )


def _silent_rows(transformer, longest_side: int) -> torch.Tensor:
    """silent_channels over a key projection's output rows, which are head-major: head h's
    channel c is row h * head_dim + c."""
    return silent_channels(transformer, longest_side).repeat(transformer.config.num_attention_heads)


def _row_parameters(layer: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters indexed by the layer's output rows: weight and bias, or, for a peft LoRA
    layer, its base layer's and every adapter's up-projection."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    parameters = [base.weight] + ([base.bias] if base.bias is not None else [])
    for up in getattr(layer, "lora_B", {}).values():
        parameters.append(up.weight)
    return parameters
