"""go_fast: an fp8 copy of a FLUX transformer.

On CUDA GPUs of compute capability 8.9 or more (H100, L40S, 4090) the copy does real fp8 matrix
products (torchao's float8 dynamic activation + weight, per-row scales). Anywhere else, the CPU
in CI included, it stores the weights in fp8 and computes in the model's dtype (torchao's float8
weight-only), which really runs, so the go_fast code is the code the tests exercise. A GPU whose
fp8 kernels fail on a first forward falls back to weight-only, and says why.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

FP8_MATMUL_CAPABILITY = (8, 9)


@dataclass(frozen=True)
class Fp8Transformer:
    module: torch.nn.Module
    mode: str  # "fp8 matmuls (float8 dynamic activation + weight, per-row)" | "fp8 weight-only"


def fp8_copy(transformer: torch.nn.Module, device: torch.device) -> Fp8Transformer:
    """A quantized deep copy; the original keeps serving bf16 requests unchanged."""
    # torchao logs missing optional CUDA kernels at import: noise on machines without them.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        quantize_,
    )

    if _has_fp8_matmuls(device):
        fast = _base_copy(transformer)
        try:
            quantize_(fast, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))
            _smoke_test(fast)
            return Fp8Transformer(fast, "fp8 matmuls (float8 dynamic activation + weight, per-row)")
        except Exception as err:  # a kernel missing from this build: weight-only still halves memory
            log.warning("fp8 matmuls failed on %s (%s); using fp8 weight-only", device, _first_line(err))
            del fast
    fast = _base_copy(transformer)
    quantize_(fast, Float8WeightOnlyConfig())
    return Fp8Transformer(fast, "fp8 weight-only")


def _base_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without the LoRA adapters the original may carry right now (they are never
    fused, so removing the adapter layers restores the base weights exactly)."""
    fast = copy.deepcopy(transformer)
    if getattr(fast, "peft_config", None):
        fast.unload_lora()
    return fast


def _has_fp8_matmuls(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MATMUL_CAPABILITY


def _smoke_test(transformer: torch.nn.Module) -> None:
    """One forward at the smallest size, so a kernel that cannot run fails here, not in a request."""
    config = transformer.config
    parameter = next(transformer.parameters())
    device, dtype = parameter.device, torch.bfloat16
    tokens, text = 16, 8
    with torch.inference_mode():
        transformer(
            hidden_states=torch.zeros(1, tokens, config.in_channels, device=device, dtype=dtype),
            encoder_hidden_states=torch.zeros(
                1, text, config.joint_attention_dim, device=device, dtype=dtype
            ),
            pooled_projections=torch.zeros(1, config.pooled_projection_dim, device=device, dtype=dtype),
            timestep=torch.ones(1, device=device, dtype=dtype),
            img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
            txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
            guidance=torch.ones(1, device=device, dtype=dtype) if config.guidance_embeds else None,
        )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else err.__class__.__name__
