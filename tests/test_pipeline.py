"""Loading through the production code: sharing by content, one copy of every weight."""

import shutil

import pytest
import torch
from PIL import Image

from flux_lora.models import identical
from flux_lora.models.identical import same_files
from flux_lora.models.layout import ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir) -> FluxPipelines:
    return FluxPipelines.load(ModelSource(tiny_model_dir), device=torch.device("cpu"))


def test_identical_components_are_loaded_once(pipelines):
    dev, schnell = pipelines.variants["dev"].txt2img, pipelines.variants["schnell"].txt2img
    for name in ("text_encoder", "text_encoder_2", "vae", "tokenizer", "tokenizer_2"):
        assert getattr(dev, name) is getattr(schnell, name), name
    assert dev.transformer is not schnell.transformer


def test_img2img_and_inpaint_hold_no_second_copy(pipelines):
    for variant in pipelines.variants.values():
        for pipe in (variant.img2img, variant.inpaint):
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
                assert getattr(pipe, name) is getattr(variant.txt2img, name)


def test_components_that_differ_on_disk_are_not_shared(tmp_path, tiny_model_dir):
    copy = tmp_path / "models"
    shutil.copytree(tiny_model_dir, copy)
    config = copy / "FLUX.1-schnell" / "vae" / "config.json"
    config.write_text(config.read_text().replace('"shift_factor": 0.1159', '"shift_factor": 0.2'))
    loaded = FluxPipelines.load(ModelSource(copy), device=torch.device("cpu"))
    dev, schnell = loaded.variants["dev"].txt2img, loaded.variants["schnell"].txt2img
    assert dev.vae is not schnell.vae
    assert schnell.vae.config.shift_factor == 0.2
    assert dev.text_encoder is schnell.text_encoder


def test_a_weights_file_of_the_same_size_with_other_bytes_is_not_shared(tmp_path, tiny_model_dir):
    copy = tmp_path / "models"
    shutil.copytree(tiny_model_dir, copy)
    weights = copy / "FLUX.1-schnell" / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor
    weights.write_bytes(data)
    assert not same_files(copy / "FLUX.1-dev" / "vae", copy / "FLUX.1-schnell" / "vae")
    assert same_files(copy / "FLUX.1-dev" / "text_encoder", copy / "FLUX.1-schnell" / "text_encoder")


def test_hard_linked_files_are_the_same_without_reading_them(tmp_path, tiny_model_dir, monkeypatch):
    """As download-weights leaves them: schnell's VAE files are links to dev's."""
    copy = tmp_path / "models"
    shutil.copytree(tiny_model_dir, copy)
    for path in (copy / "FLUX.1-schnell" / "vae").iterdir():
        path.unlink()
        path.hardlink_to(copy / "FLUX.1-dev" / "vae" / path.name)

    def no_reading(*paths):
        raise AssertionError(f"read {paths}")

    monkeypatch.setattr(identical, "_same_bytes", no_reading)
    assert same_files(copy / "FLUX.1-dev" / "vae", copy / "FLUX.1-schnell" / "vae")


def test_same_seed_same_pixels_in_process(pipelines):
    request = GenerationRequest(prompt="a cat", num_inference_steps=2)
    first = pipelines.generate(request, size=(256, 256), seed=11)[0]
    second = pipelines.generate(request, size=(256, 256), seed=11)[0]
    assert list(first.getdata()) == list(second.getdata())


def test_inpaint_with_all_black_mask_stays_close_to_the_input(pipelines):
    """Black is kept: the result differs from the input only by the VAE's round trip,
    far less than a white (fully repainted) mask changes it."""
    source = Image.new("RGB", (256, 256), (200, 40, 40))
    request = GenerationRequest(
        prompt="a cat", image="in.png", mask="mask.png", num_inference_steps=4, prompt_strength=1.0
    )

    def distance(mask_value: int) -> float:
        mask = Image.new("L", (256, 256), mask_value)
        out = pipelines.generate(request, size=(256, 256), seed=5, image=source, mask=mask)[0]
        a = torch.tensor(list(out.getdata()), dtype=torch.float32)
        b = torch.tensor(list(source.getdata()), dtype=torch.float32)
        return (a - b).abs().mean().item()

    assert distance(0) < distance(255)
