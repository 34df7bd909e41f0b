"""go_fast's fp8 copy: what it holds, what it shares, and the order in which it falls back."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from flux_lora.device import quant
from flux_lora.device.tensors import module_bytes, stored_tensors


@pytest.fixture
def transformer(tiny_model_dir: Path) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(
        tiny_model_dir / "FLUX.1-dev" / "transformer", dtype=torch.bfloat16
    )


def storages(module: torch.nn.Module) -> set[int]:
    return {stored.tensor.untyped_storage().data_ptr() for stored in stored_tensors(module)}


def test_the_copy_holds_fp8_weights_and_shares_nothing(transformer):
    """The copy reads the original's linear weights in place while quantizing (no second bf16
    transformer), then holds only memory of its own: moving the original cannot move the copy."""
    fast = quant.fp8_copy(transformer, torch.device("cpu"), text_tokens=512)
    assert fast.mode == "fp8 weight-only"
    assert not storages(fast.module) & storages(transformer)
    weights = [s.tensor for s in stored_tensors(fast.module) if s.name.endswith("weight:qdata")]
    assert weights and all(w.dtype == torch.float8_e4m3fn for w in weights)
    # Sized by what is stored: an fp8 weight reports bf16, which once counted it twice.
    assert module_bytes(fast.module) < 0.6 * module_bytes(transformer)
    assert quant.fp8_copy_bytes(transformer) == pytest.approx(module_bytes(fast.module), rel=0.05)


def test_the_smoke_test_runs_the_smallest_shapes_a_request_has(transformer):
    fast = quant.fp8_copy(transformer, torch.device("cpu"), text_tokens=512).module
    for tokens in quant.SMOKE_IMAGE_TOKENS:
        quant._smoke_test(fast, torch.bfloat16, tokens, 256)


def test_fp8_matmuls_fall_back_per_row_then_per_tensor_then_weight_only(transformer, monkeypatch, caplog):
    """On this CPU torchao refuses dynamic fp8 activations, as a GPU's missing kernel would fail:
    each choice is tried in order, and the log says why each was left."""
    monkeypatch.setattr(quant, "_has_fp8_matmuls", lambda device: True)
    with caplog.at_level(logging.WARNING, logger="flux_lora.device.quant"):
        fast = quant.fp8_copy(transformer, torch.device("cpu"), text_tokens=512)
    assert fast.mode == "fp8 weight-only"
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("fp8 matmuls, per-row, failed on cpu (")
    assert lines[1].startswith("fp8 matmuls, per-tensor, failed on cpu (")
    assert lines[2] == "fp8 matmuls unavailable on cpu: go_fast uses fp8 weight-only"
