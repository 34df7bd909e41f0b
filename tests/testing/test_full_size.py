"""The benchmark's full-size FLUX, built by our loader's random-weights path on the meta device:
the parameter counts of the real FLUX.1 modules, and the tiny one loads and runs through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, T5EncoderModel

from flux_lora.models.components import random_module
from flux_lora.models.layout import ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest
from flux_lora.testing.full_size import write_model_folder

# Parameter counts of the FLUX.1 [dev] repository's modules.
REAL_SIZES = {
    ("transformer", FluxTransformer2DModel): 11.90e9,
    ("text_encoder_2", T5EncoderModel): 4.76e9,
    ("text_encoder", CLIPTextModel): 0.123e9,
    ("vae", AutoencoderKL): 0.0838e9,
}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model_folder(tmp_path_factory.mktemp("full") / "model", full=True)


@pytest.mark.parametrize(
    ("component", "component_class", "expected"), [(*k, v) for k, v in REAL_SIZES.items()]
)
def test_full_size_modules_have_flux_sizes(full_size: Path, component, component_class, expected):
    module = random_module(
        component_class, full_size / "FLUX.1-dev" / component, torch.device("meta"), torch.bfloat16
    )
    count = sum(p.numel() for p in module.parameters())
    assert abs(count - expected) / expected < 0.01, f"{component}: {count / 1e9:.3f} B parameters"
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}


def test_the_random_weights_folder_loads_and_generates_at_tiny_size(tmp_path: Path):
    root = write_model_folder(tmp_path / "model", full=False)
    assert not list((root / "FLUX.1-dev").rglob("*.safetensors"))  # configs only
    pipelines = FluxPipelines.load(ModelSource(root, random_weights=True), torch.device("cpu"))
    images = pipelines.generate(
        GenerationRequest(prompt="a cat", num_inference_steps=2), size=(64, 64), seed=1
    )
    assert images[0].size == (64, 64)
