"""A LoRA file's layout and adapter type, read from its keys: named in errors and by
`resolve-lora --file FILE`, and adapter types this container does not apply exactly refused whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux_lora.__main__ import main
from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.lora.layouts import LORA, detect
from flux_lora.models.layout import DEMO_MODEL_DIR
from tests.conftest import output_images, predict_failed, predict_ok
from tests.fakes import make_safetensors

FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 7}
BLOCK = "lora_unet_double_blocks_0_img_attn_qkv"


def tensors(*names: str) -> dict[str, torch.Tensor]:
    return {name: torch.ones(4, 4) for name in names}


REFUSED = {
    "LyCORIS LoKr": tensors(f"{BLOCK}.lokr_w1", f"{BLOCK}.lokr_w2", f"{BLOCK}.alpha"),
    "LyCORIS LoHa": tensors(*(f"{BLOCK}.hada_w{i}_{ab}" for i in (1, 2) for ab in "ab"), f"{BLOCK}.alpha"),
    "DoRA": tensors(
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector",
    ),
    "full weight differences": tensors("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff"),
}


@pytest.mark.parametrize(
    ("keys", "layout", "adapter"),
    [
        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers / peft", LORA),
        (
            [f"{BLOCK}.lora_down.weight", f"{BLOCK}.alpha", "lora_te1_text_model_x.lora_up.weight"],
            "kohya (sd-scripts)",
            LORA,
        ),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "BFL / ComfyUI", LORA),
        (["double_blocks.0.processor.proj_lora1.down.weight"], "XLabs", LORA),
        (["lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight"], "OneTrainer", LORA),
        (
            ["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"],
            "SimpleTuner LyCORIS",
            "LyCORIS LoKr (Kronecker product)",
        ),
        (
            ["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"],
            "fal (peft's base_model.model.)",
            LORA,
        ),
        (["diffusion_model.img_in.diff_b"], "BFL / ComfyUI", "full weight differences (.diff, .diff_b)"),
        (["something.else"], "unknown", LORA),
    ],
)
def test_detect_names_the_layout_and_the_adapter_type(keys, layout, adapter):
    found = detect(keys)
    assert (found.layout, found.adapter) == (layout, adapter)
    assert found.text_encoder_keys == sum("lora_te" in key for key in keys)


def test_a_diffusion_model_prefix_is_not_a_diff():
    assert detect(["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"]).applied


@pytest.mark.parametrize("adapter", list(REFUSED))
def test_an_adapter_type_not_applied_exactly_is_refused_whole(server: CogServer, adapter: str):
    """diffusers would load a DoRA file without its magnitude (a warning in its log only); each
    of these is refused naming what it is, and the next request draws exactly the base picture."""
    base = output_images(predict_ok(server, prompt="a cat", **FAST))
    lora = bytes_to_data_uri(make_safetensors(REFUSED[adapter]))
    error = predict_failed(server, prompt="a cat", replicate_weights=lora, **FAST)
    assert "replicate_weights: data:" in error and f"holds {adapter}" in error, error
    assert "applies LoRA adapters (lora_A/lora_B or lora_down/lora_up pairs) only" in error
    assert output_images(predict_ok(server, prompt="a cat", **FAST)) == base


def test_resolve_lora_reports_a_local_files_layout_and_layers(capsys):
    assert main(["resolve-lora", "--file", str(DEMO_MODEL_DIR / "stripes-lora.safetensors")]) == 0
    report = capsys.readouterr().out
    assert "LoRA in the diffusers / peft layout" in report
    assert "34 transformer layers, rank 8:" in report
    assert "    transformer_blocks.N.attn.to_q (N = 0-1)" in report
    assert "    single_transformer_blocks.N.proj_mlp (N = 0-1)" in report


def test_resolve_lora_refuses_a_file_the_server_would_refuse(tmp_path: Path, capsys):
    path = tmp_path / "lokr.safetensors"
    path.write_bytes(make_safetensors(REFUSED["LyCORIS LoKr"]))
    assert main(["resolve-lora", "--file", str(path)]) == 2
    assert (
        "holds LyCORIS LoKr (Kronecker product) in the kohya (sd-scripts) layout" in capsys.readouterr().err
    )
