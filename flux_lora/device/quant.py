"""go_fast: an fp8 copy of a FLUX transformer.

On CUDA GPUs of compute capability 8.9 or more (H100, L40S, 4090) the copy does real fp8 matrix
products (torchao's float8 dynamic activation + weight, per-row scales, else per-tensor). Anywhere
else, the CPU in CI included, it stores the weights in fp8 and computes in the model's dtype
(torchao's float8 weight-only), which really runs, so the go_fast code is the code the tests
exercise.

Each choice must first run a forward at the smallest shapes a go_fast request can have, or the
next is tried, and the log says why. On an H200 (torch 2.11, CUDA 13, torchao 0.18) per-row
scaling failed in cuBLASLt (CUBLAS_STATUS_NOT_SUPPORTED) for a toy shape: rowwise fp8 is known to
fail for large inner dimensions (FLUX's 12288 and 15360) with 256 rows or fewer (pytorch/ao#4582),
and per-tensor scaling works there. A test at a shape no request has would reject a mode that
works, or accept one that fails in a request: hence the smallest real shapes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

FP8_MATMUL_CAPABILITY = (8, 9)
# Image tokens of the smallest go_fast inputs: a 16x16 image (img2img takes any size), 256x256
# and the smallest preset, 512x512. The text is the release's T5 length.
SMOKE_IMAGE_TOKENS = (1, 256, 1024)


FP8_MATMULS = "fp8 matmuls"  # how the modes that compute in fp8 begin


@dataclass(frozen=True)
class Fp8Transformer:
    module: torch.nn.Module
    mode: str  # "fp8 matmuls (float8 dynamic activation + weight, per-row)" | "fp8 weight-only"


def quantizes_activations(mode: str) -> bool:
    """Whether a go_fast mode quantizes each layer's input as it comes (the fp8 matmuls do)."""
    return mode.startswith(FP8_MATMULS)


def fp8_copy(transformer: torch.nn.Module, device: torch.device, text_tokens: int) -> Fp8Transformer:
    """A quantized deep copy; the original keeps serving bf16 requests unchanged."""
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        Float8WeightOnlyConfig,
        PerRow,
        PerTensor,
        quantize_,
    )

    dtype = next(transformer.parameters()).dtype  # the serving dtype, which the copy computes in
    if _has_fp8_matmuls(device):
        for scaling, granularity in (("per-row", PerRow()), ("per-tensor", PerTensor())):
            fast = _base_copy(transformer)
            try:
                quantize_(fast, Float8DynamicActivationFloat8WeightConfig(granularity=granularity))
                for tokens in SMOKE_IMAGE_TOKENS:
                    _smoke_test(fast, dtype, tokens, text_tokens)
                return Fp8Transformer(fast, f"{FP8_MATMULS} (float8 dynamic activation + weight, {scaling})")
            except Exception as err:  # a kernel this build lacks for some shape: try the next
                log.warning("fp8 matmuls, %s, failed on %s (%s)", scaling, device, _first_line(err))
                del fast
        log.warning("fp8 matmuls unavailable on %s: go_fast uses fp8 weight-only", device)
    fast = _base_copy(transformer)
    quantize_(fast, Float8WeightOnlyConfig())
    return Fp8Transformer(fast, "fp8 weight-only")


def fp8_copy_bytes(transformer: torch.nn.Module) -> int:
    """What the copy will take: a byte per linear weight value and a float32 scale per row (at
    most), the rest as it is."""
    linear = {id(w): w for w in _linear_weights(transformer)}
    return sum(
        t.numel() + 4 * t.shape[0] if id(t) in linear else t.numel() * t.element_size()
        for t in [*transformer.parameters(), *transformer.buffers()]
    )


def _base_copy(transformer: torch.nn.Module) -> torch.nn.Module:
    """A deep copy without the LoRA adapters the original may carry right now (they are never
    fused, so removing the adapter layers restores the base weights exactly). The copy's linear
    weights share the original's memory until `quantize_` replaces them one layer at a time: the
    copy never holds a second full-precision transformer (24 GB at full size, in bf16)."""
    shared = {
        id(w): torch.nn.Parameter(w.detach(), requires_grad=False) for w in _linear_weights(transformer)
    }
    fast = copy.deepcopy(transformer, memo=shared)
    if getattr(fast, "peft_config", None):
        fast.unload_lora()
    return fast


def _linear_weights(transformer: torch.nn.Module) -> list[torch.Tensor]:
    return [
        layer.weight
        for path, layer in transformer.named_modules()
        if isinstance(layer, torch.nn.Linear) and ".lora_" not in path
    ]


def _has_fp8_matmuls(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= FP8_MATMUL_CAPABILITY


def _smoke_test(transformer: torch.nn.Module, dtype: torch.dtype, tokens: int, text: int) -> None:
    """One forward in the serving dtype, so a kernel that cannot run fails here, not in a request."""
    device = next(transformer.parameters()).device
    with torch.inference_mode():
        transformer(**transformer_inputs(transformer, device, dtype, tokens=tokens, text=text))


def transformer_inputs(
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tokens: int = 1024,
    text: int = 512,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for one transformer step; by default 1024 image tokens (512x512) and 512
    text tokens (dev's T5 length)."""
    config = transformer.config
    generator = torch.Generator("cpu").manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return dict(
        hidden_states=random(batch, tokens, config.in_channels),
        encoder_hidden_states=random(batch, text, config.joint_attention_dim),
        pooled_projections=random(batch, config.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.0, device=device, dtype=dtype) if config.guidance_embeds else None,
    )


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else err.__class__.__name__
