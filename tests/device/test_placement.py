"""GPU placement: which transformers stay on the device within a budget, and how they move. The
decisions, the bookkeeping and the flat-buffer moves (CPU to CPU here, in bf16) are checked on
CPU modules; pinning and the bus need a GPU (the GPU benchmark times a full-size move)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import FluxTransformer2DModel

from flux_lora.device.placement import Residency, evictions
from flux_lora.device.quant import transformer_inputs
from flux_lora.device.tensors import module_bytes

GB = 1024**3


def test_full_size_flux_arithmetic_needs_placement():
    """The decision in numbers (bf16 bytes, FLUX.1 parameter counts): both releases in bf16 and
    fp8 with the shared encoders do not fit an 80 GB H100 beside 8 GiB of activations; with one
    bf16 transformer off the GPU they do."""
    transformer, fp8, t5, clip_vae = 11.9e9 * 2, 11.9e9, 4.76e9 * 2, 0.25e9 + 0.17e9
    slots = 5.4e6 * 64 * 2 * 2  # rank 64, two slots, (in + out) summed over the linear layers, bf16
    everything = 2 * (transformer + slots) + 2 * (fp8 + slots) + t5 + clip_vae
    h100 = 80e9
    assert everything + 8 * GB > h100
    assert everything - (transformer + slots) + 8 * GB < h100


def test_evictions_take_the_least_recently_used_evictable():
    sizes = {"dev": 24, "schnell": 24, "dev-fp8": 12}
    resident = ["dev", "dev-fp8", "schnell"]  # oldest first
    evictable = {"dev", "schnell"}
    assert evictions(sizes, resident, evictable, need=0, budget=60, keep=set()) == []
    assert evictions(sizes, resident, evictable, need=24, budget=70, keep=set()) == ["dev"]
    assert evictions(sizes, resident, evictable, need=24, budget=70, keep={"dev"}) == ["schnell"]
    assert evictions(sizes, resident, evictable, need=48, budget=70, keep=set()) == ["dev", "schnell"]
    with pytest.raises(MemoryError, match="FLUX_LORA_GPU_RESERVE_GB"):
        evictions(sizes, resident, evictable, need=70, budget=70, keep=set())  # fp8 must stay


def linear(megabytes: int) -> torch.nn.Module:
    return torch.nn.Linear(megabytes * 1024**2 // 4, 1, bias=False)  # float32


def test_residency_keeps_the_recently_used_within_budget():
    modules = {key: linear(4) for key in ("dev", "schnell")}
    residency = Residency(torch.device("cpu"), budget=9 * 1024**2)  # room for one 4 MB module beside the rest
    residency.add("dev", modules["dev"])
    residency.add("schnell", modules["schnell"])
    assert list(residency.resident) == ["dev", "schnell"]
    residency.add("fp8", linear(2), evictable=False)  # 4 + 4 + 2 > 9: the oldest bf16 one goes
    assert list(residency.resident) == ["schnell", "fp8"]
    residency.ensure("dev")  # back, and the other bf16 one makes way
    assert list(residency.resident) == ["fp8", "dev"]
    residency.ensure("fp8")
    assert list(residency.resident) == ["dev", "fp8"]
    residency.make_room(module_bytes(modules["dev"]))  # a temporary copy beside fp8: dev goes
    assert list(residency.resident) == ["fp8"]
    residency.ensure("unknown")  # modules it does not manage are left alone
    with pytest.raises(MemoryError, match="does not fit"):
        residency.make_room(8 * 1024**2)  # fp8 must stay: 2 + 8 > 9


def step(transformer: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(
            **transformer_inputs(transformer, torch.device("cpu"), torch.bfloat16, tokens=64, text=8)
        ).sample


def storage_within(tensor: torch.Tensor, flat: torch.Tensor) -> bool:
    start = flat.untyped_storage().data_ptr()
    return start <= tensor.untyped_storage().data_ptr() < start + flat.numel()


def test_a_transformer_moves_in_one_buffer_and_comes_back_bit_for_bit(tiny_model_dir: Path):
    transformer = FluxTransformer2DModel.from_pretrained(
        tiny_model_dir / "FLUX.1-dev" / "transformer", dtype=torch.bfloat16
    )
    before = {name: tensor.clone() for name, tensor in transformer.state_dict().items()}
    output = step(transformer)
    residency = Residency(torch.device("cpu"), budget=2**62)
    residency.add("dev", transformer)
    for _ in range(2):
        residency.evict("dev")
        flat = residency.flat["dev"]
        assert flat.here is None and not flat.home.is_pinned()  # pinned only where CUDA is
        assert all(storage_within(t, flat.home) for t in transformer.parameters())
        residency.ensure("dev")
        assert all(storage_within(t, flat.here) for t in transformer.parameters())  # one buffer, one copy
    assert [where for _, where, _ in residency.moves] == ["off", "on", "off", "on"]
    after = transformer.state_dict()
    assert all(
        after[name].dtype == torch.bfloat16 and torch.equal(after[name], before[name]) for name in before
    )
    assert torch.equal(step(transformer), output)


def test_a_module_that_gained_tensors_gets_a_new_layout(tiny_model_dir: Path):
    """A LoRA adapter loaded while on the device adds tensors: the next move lays them out too."""
    transformer = FluxTransformer2DModel.from_pretrained(
        tiny_model_dir / "FLUX.1-dev" / "transformer", dtype=torch.bfloat16
    )
    residency = Residency(torch.device("cpu"), budget=2**62)
    residency.add("dev", transformer)
    residency.evict("dev")
    residency.ensure("dev")
    first = residency.flat["dev"]
    transformer.time_text_embed.register_buffer("extra", torch.ones(3, dtype=torch.bfloat16))
    assert first.stale()
    residency.evict("dev")
    assert residency.flat["dev"] is not first
    assert storage_within(transformer.time_text_embed.extra, residency.flat["dev"].home)
