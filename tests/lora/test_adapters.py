"""LoRA formats and adapter handling, through the production loading code.

Layouts are also checked at FLUX.1's full width, against the layers of a full-width transformer
built on the meta device (no memory): fused layers split at the model's own widths. Every layout
and adapter type, layer by layer, is in test_formats.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import save_file

from flux_lora.errors import InputError
from flux_lora.lora.adapters import AdapterSet, WantedAdapter, read_lora
from flux_lora.lora.convert import convert
from flux_lora.lora.names import ModuleNames
from flux_lora.models.layout import ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest
from flux_lora.testing import tiny
from tests.lora import formats

FULL_WIDTH, MLP_WIDTH, RANK = 3072, 12288, 2


@pytest.fixture(scope="module")
def pipelines(tiny_model_dir) -> FluxPipelines:
    return FluxPipelines.load(ModelSource(tiny_model_dir), device=torch.device("cpu"))


@pytest.fixture
def adapters(pipelines):
    adapter_set = AdapterSet(pipelines.variants["dev"].txt2img.transformer)
    yield adapter_set
    adapter_set.activate([])


def render(pipelines: FluxPipelines) -> torch.Tensor:
    request = GenerationRequest(prompt="a cat", num_inference_steps=2)
    image = pipelines.generate(request, size=(128, 128), seed=3)[0]
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).float()


def peft_lora(path: Path, *, prefix: str = "transformer.", seed: int = 0) -> str:
    """A diffusers/peft LoRA on every attention and projection layer (the trainer's layout)."""
    path.write_bytes(tiny.random_lora(seed=seed, prefix=prefix))
    return str(path)


def wanted(path: str, scale: float = 1.0, identity: str | None = None, label: str = "replicate_weights"):
    return WantedAdapter(identity or path, path, scale, label, Path(path).name)


def test_scale_zero_is_exactly_the_base_and_scale_one_is_not(pipelines, adapters, tmp_path):
    base = render(pipelines)
    lora = peft_lora(tmp_path / "a.safetensors")
    adapters.activate([wanted(lora, 0.0)])
    assert torch.equal(render(pipelines), base)
    adapters.activate([wanted(lora, 1.0)])
    assert not torch.equal(render(pipelines), base)


def test_strength_is_linear_in_the_scale(adapters, tmp_path):
    lora = peft_lora(tmp_path / "a.safetensors")
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    deltas = {}
    for scale in (0.0, 0.7, 1.4, -1.0):
        adapters.activate([wanted(lora, scale)])
        layer = adapters.transformer.transformer_blocks[0].attn.to_q  # wrapped by peft once loaded
        with torch.no_grad():
            deltas[scale] = layer(x) - layer.base_layer(x)
    assert torch.count_nonzero(deltas[0.0]) == 0
    torch.testing.assert_close(deltas[1.4], 2 * deltas[0.7])
    torch.testing.assert_close(deltas[-1.0], -deltas[0.7] / 0.7, rtol=1e-4, atol=1e-5)


def test_network_alphas_scale_their_layers(adapters, tmp_path):
    """A file with `.alpha` keys (alpha 2 at rank 4: half strength on that layer). diffusers
    refused these when loaded without a key prefix; we load with it."""
    tensors = safetensors.torch.load(tiny.random_lora(seed=3))
    layer_key = "transformer.transformer_blocks.0.attn.to_q"
    rank = tensors[f"{layer_key}.lora_A.weight"].shape[0]
    plain, halved = tmp_path / "plain.safetensors", tmp_path / "alpha.safetensors"
    save_file(tensors, plain)
    save_file({**tensors, f"{layer_key}.alpha": torch.tensor(rank / 2)}, halved)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    deltas = {}
    for path in (plain, halved):
        adapters.activate([wanted(str(path))])
        layer = adapters.transformer.transformer_blocks[0].attn.to_q
        with torch.no_grad():
            deltas[path] = layer(x) - layer.base_layer(x)
    torch.testing.assert_close(deltas[halved], deltas[plain] / 2)


def test_go_fast_multiplier_scales_both_adapters(adapters, tmp_path):
    main = peft_lora(tmp_path / "a.safetensors", seed=1)
    extra = peft_lora(tmp_path / "b.safetensors", seed=2)
    adapters.activate([wanted(main, 0.8), wanted(extra, 0.4, label="extra_lora")], multiplier=1.5)
    assert sorted(adapters.active.values()) == pytest.approx([0.6, 1.2])


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_diffusers_keys_with_and_without_prefix_change_the_image(pipelines, adapters, tmp_path, prefix):
    base = render(pipelines)
    adapters.activate([wanted(peft_lora(tmp_path / "l.safetensors", prefix=prefix))])
    assert not torch.equal(render(pipelines), base)


def test_xlabs_format_loads_into_the_tiny_model(pipelines, adapters, tmp_path):
    width = adapters.transformer.config.num_attention_heads * adapters.transformer.config.attention_head_dim
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name in ("qkv_lora1", "proj_lora1", "qkv_lora2", "proj_lora2"):
        out = 3 * width if name.startswith("qkv") else width
        tensors[f"double_blocks.0.processor.{name}.down.weight"] = torch.randn(
            RANK, width, generator=generator
        )
        tensors[f"double_blocks.0.processor.{name}.up.weight"] = torch.randn(out, RANK, generator=generator)
    save_file(tensors, tmp_path / "xlabs.safetensors")
    base = render(pipelines)
    adapters.activate([wanted(str(tmp_path / "xlabs.safetensors"))])
    assert not torch.equal(render(pipelines), base)


def test_two_adapters_combine_and_unchanged_requests_do_not_reload(pipelines, adapters, tmp_path, caplog):
    main = peft_lora(tmp_path / "a.safetensors", seed=1)
    extra = peft_lora(tmp_path / "b.safetensors", seed=2)
    adapters.activate([wanted(main)])
    only_main = render(pipelines)
    adapters.activate([wanted(main), wanted(extra, label="extra_lora")])
    both = render(pipelines)
    assert not torch.equal(both, only_main)
    with caplog.at_level(logging.INFO, logger="flux_lora.lora.adapters"):
        assert adapters.activate([wanted(main), wanted(extra, label="extra_lora")]) == 0.0
    assert (
        "LoRA: replicate_weights (a.safetensors) at scale 1, extra_lora (b.safetensors) at scale 1, "
        "already in place: nothing to load" in caplog.text
    )
    assert len(adapters.loaded) == 2


def test_swapping_keeps_only_the_wanted_adapters_and_none_restores_the_base(pipelines, adapters, tmp_path):
    base = render(pipelines)
    first = peft_lora(tmp_path / "a.safetensors", seed=1)
    second = peft_lora(tmp_path / "b.safetensors", seed=2)
    adapters.activate([wanted(first)])
    adapters.activate([wanted(second)])
    assert list(adapters.loaded) == [second]
    assert list(adapters.transformer.peft_config) == list(adapters.active)
    adapters.activate([])
    assert not hasattr(adapters.transformer, "peft_config") or not adapters.transformer.peft_config
    assert torch.equal(render(pipelines), base)


def test_lora_for_another_model_is_an_error_and_changes_nothing(pipelines, adapters, tmp_path):
    good = peft_lora(tmp_path / "good.safetensors")
    adapters.activate([wanted(good)])
    before = render(pipelines)
    sdxl = tmp_path / "sdxl.safetensors"  # SDXL UNet layer names and widths
    save_file(
        {
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(
                4, 640
            ),
            "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(
                640, 4
            ),
        },
        sdxl,
    )
    with pytest.raises(
        InputError, match=r"extra_lora: sdxl.safetensors: no key matches a FLUX transformer layer"
    ):
        adapters.activate([wanted(good), wanted(str(sdxl), label="extra_lora")])
    assert torch.equal(render(pipelines), before)
    assert list(adapters.loaded) == [good]


def test_wrong_shapes_on_flux_names_are_an_error_and_roll_back(pipelines, adapters, tmp_path):
    base = render(pipelines)
    wrong = tmp_path / "wrong.safetensors"
    save_file(
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 3072),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(3072, 4),
        },
        wrong,
    )
    with pytest.raises(
        InputError, match=r"updates a 3072 x 3072 weight, and transformer_blocks.0.attn.to_q is 32 x 32"
    ):
        adapters.activate([wanted(str(wrong))])
    assert adapters.loaded == {}
    assert torch.equal(render(pipelines), base)


def test_a_file_with_no_transformer_keys_is_an_error(adapters, tmp_path):
    empty = tmp_path / "te-only.safetensors"
    save_file({"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.randn(2, 8)}, empty)
    with pytest.raises(InputError, match="has no weights for the FLUX transformer"):
        adapters.activate([wanted(str(empty))])


# --- full-size conversions ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_size_names() -> ModuleNames:
    """The linear layers of a full-width FLUX.1 [dev] transformer (1 block of each kind), on meta."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    return ModuleNames.of(model)


@pytest.mark.parametrize(
    "layout",
    [
        "kohya",
        "BFL with biases",
        "OneTrainer",
        "OneTrainer OMI",
        "kohya LoKr",
        "LoHa",
        "DiffSynth",
        "fal",
        "XLabs",
    ],
)
def test_full_size_files_split_at_full_size_offsets(layout: str, full_size_names: ModuleNames):
    """Fused layers split at FLUX.1's own widths (3072, 12288), not the tiny model's."""
    written = formats.write(layout, hidden=FULL_WIDTH, mlp=MLP_WIDTH)
    converted = convert(written.tensors, written.header, full_size_names, "replicate_weights: file")
    assert set(converted.updates) == set(written.expected)
    for module, (weight, bias) in written.expected.items():
        update = converted.updates[module]
        if weight is not None:  # a few rows at each end: enough to see any offset
            for rows in (slice(0, 4), slice(-4, None)):
                torch.testing.assert_close(update.product()[rows], weight[rows], rtol=1e-4, atol=1e-4)
        if bias is not None:
            torch.testing.assert_close(update.bias, bias)


def test_a_file_for_another_model_names_its_keys(tmp_path):
    path = tmp_path / "sd15.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 16), "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(16, 2)}, path)  # fmt: skip
    names = AdapterSet(FluxTransformer2DModel(**tiny.TRANSFORMER)).names
    with pytest.raises(
        InputError, match=r"no key matches a FLUX transformer layer .*lora_unet_down_blocks_0"
    ):
        read_lora(str(path), "extra_lora", "sd15.safetensors", names)


def test_a_bias_update_for_a_layer_without_a_bias_is_refused():
    model = FluxTransformer2DModel(**tiny.TRANSFORMER)
    model.proj_out.bias = None
    with pytest.raises(InputError, match=r"final_layer.linear updates the bias of proj_out, which has none"):
        convert(
            {"diffusion_model.final_layer.linear.diff_b": torch.zeros(64)}, None, ModuleNames.of(model), "f"
        )
