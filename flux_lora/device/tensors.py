"""How a module's tensors are stored: each parameter and buffer as the plain tensors that hold it.

Quantized weights (torchao's `Float8Tensor`) report the dtype they stand for (bf16), not the one
they are stored in (fp8), and `element_size()` follows the reported dtype: counted naively, an fp8
copy looks twice its size. Everything that sizes or describes modules goes through here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


@dataclass(frozen=True)
class Stored:
    """One plain tensor as stored: a parameter or buffer, or a part of a quantized one."""

    name: str
    tensor: torch.Tensor
    is_value: bool  # holds the parameter's values (not a quantization scale)
    quantized: bool  # part of a quantized tensor subclass


def stored_tensors(module: torch.nn.Module) -> Iterator[Stored]:
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if not is_traceable_wrapper_subclass(tensor):
            yield Stored(name, tensor, is_value=True, quantized=False)
            continue
        parts, _ = tensor.__tensor_flatten__()
        for part in parts:
            inner = getattr(tensor, part)
            # The part with one element per parameter value holds the values (torchao: qdata).
            yield Stored(f"{name}:{part}", inner, is_value=inner.numel() == tensor.numel(), quantized=True)


def module_bytes(module: torch.nn.Module) -> int:
    return sum(s.tensor.numel() * s.tensor.element_size() for s in stored_tensors(module))
