"""A LoRA file's layout and adapter type, read from its keys: named in errors and by
`resolve-lora --file FILE`, and adapter types this container does not apply exactly refused whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flux_lora.__main__ import main
from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.lora.layouts import detect
from flux_lora.models.layout import DEMO_MODEL_DIR
from tests.conftest import output_images, predict_failed, predict_ok
from tests.fakes import make_safetensors

FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 7}
BLOCK = "lora_unet_double_blocks_0_img_attn_qkv"


def tensors(*names: str, shape: tuple[int, ...] = (4, 32)) -> dict[str, torch.Tensor]:
    return {name: torch.ones(shape) for name in names}


Q = "transformer.transformer_blocks.0.attn.to_q"
REFUSED = {  # what a file holds -> (its tensors, what the error must say)
    "a DoRA magnitude of no layer's shape": (
        tensors(f"{Q}.lora_A.weight", f"{Q}.lora_magnitude_vector")
        | tensors(f"{Q}.lora_B.weight", shape=(32, 4)),
        "DoRA magnitude has shape (4, 32), neither one value per output (32) nor per input (32)",
    ),
    "Tucker factors": (tensors(f"{BLOCK}.lokr_w1", f"{BLOCK}.lokr_w2", f"{BLOCK}.lokr_t2"), "Tucker factors"),
    "a norm difference of another width": (
        tensors("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff", shape=(128,)),
        "names the norm transformer_blocks.0.attn.norm_q (width 16) with {'diff': (128,)}",
    ),
    "a control LoRA": (
        tensors("img_in.lora_A.weight", shape=(4, 128)) | tensors("img_in.lora_B.weight", shape=(32, 4)),
        "is a control LoRA (Canny, Depth or Fill), which needs a control image",
    ),
    "a BFL control LoRA's norm scales": (
        tensors("img_in.lora_A.weight", shape=(4, 128))
        | tensors("img_in.lora_B.weight", shape=(32, 4))
        | tensors("double_blocks.0.img_attn.norm.query_norm.scale", shape=(16,)),
        "replaces norm scales (e.g. double_blocks.0.img_attn.norm.query_norm.scale), as BFL's control LoRAs",
    ),
    "another adapter type": (tensors(f"{BLOCK}.oft_blocks"), "of no adapter type this container knows"),
    "one layer twice": (
        tensors(f"{Q}.lora_A.weight", "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight")
        | tensors(
            f"{Q}.lora_B.weight", "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight", shape=(32, 4)
        ),
        "update transformer_blocks.0.attn.to_q; a file that updates a layer twice is ambiguous",
    ),
}


@pytest.mark.parametrize(
    ("keys", "layout"),
    [
        (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"], "diffusers / peft"),
        (
            [f"{BLOCK}.lora_down.weight", f"{BLOCK}.alpha", "lora_te1_text_model_x.lora_up.weight"],
            "kohya (sd-scripts)",
        ),
        (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "BFL / ComfyUI"),
        (["double_blocks.0.processor.proj_lora1.down.weight"], "XLabs"),
        (["lora_transformer_single_transformer_blocks_0_proj_out.lora_down.weight"], "OneTrainer"),
        (["transformer.double_blocks.0.img_attn.qkv.0.lora_down.weight"], "OneTrainer OMI"),
        (["lycoris_transformer_blocks_0_attn_to_q.lokr_w1"], "SimpleTuner LyCORIS"),
        (["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"], "fal (peft's base_model.model.)"),
        (["blocks.0.attn.a_to_qkv.lora_A.default.weight"], "DiffSynth"),
        (["img_in.lora_A.weight", "double_blocks.0.img_attn.qkv.lora_A.weight"], "BFL"),
        (["something.else"], "unknown"),
    ],
)
def test_detect_names_the_layout(keys, layout):
    assert detect(keys).layout == layout


@pytest.mark.parametrize("refused", list(REFUSED))
def test_a_file_not_applied_whole_is_refused_and_changes_nothing(server: CogServer, refused: str):
    """Each of these is refused naming what it is, and the next request draws exactly the base
    picture."""
    base = output_images(predict_ok(server, prompt="a cat", **FAST))
    file, message = REFUSED[refused]
    error = predict_failed(
        server, prompt="a cat", replicate_weights=bytes_to_data_uri(make_safetensors(file)), **FAST
    )
    assert "replicate_weights: data:" in error and message in error, error
    assert output_images(predict_ok(server, prompt="a cat", **FAST)) == base


def test_resolve_lora_reports_a_local_files_layout_and_layers(capsys):
    assert main(["resolve-lora", "--file", str(DEMO_MODEL_DIR / "stripes-lora.safetensors")]) == 0
    report = capsys.readouterr().out
    assert "LoRA in the diffusers / peft layout" in report
    assert "34 transformer layers:" in report
    assert "    transformer_blocks.N.attn.to_q (N = 0-1): LoRA, rank 8" in report
    assert "    single_transformer_blocks.N.proj_mlp (N = 0-1): LoRA, rank 8" in report


def test_resolve_lora_refuses_a_file_the_server_would_refuse(tmp_path: Path, capsys):
    path = tmp_path / "tucker.safetensors"
    path.write_bytes(make_safetensors(REFUSED["Tucker factors"][0]))
    assert main(["resolve-lora", "--file", str(path)]) == 2
    assert "file: tucker.safetensors holds LyCORIS Tucker factors" in capsys.readouterr().err


def test_resolve_lora_lists_the_layers_of_each_part(
    tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys
):
    """Fused BFL layers by their diffusers targets; text-encoder parts, per encoder, by layer."""
    import safetensors.torch

    from tests.lora.formats import write

    monkeypatch.setenv("FLUX_MODEL_DIR", str(tiny_model_dir))
    path = tmp_path / "kohya.safetensors"
    safetensors.torch.save_file(write("kohya").tensors, path)
    assert main(["resolve-lora", "--file", str(path)]) == 0
    report = capsys.readouterr().out
    assert (
        "LoRA in the kohya (sd-scripts) layout (e.g. lora_unet_double_blocks_0_img_attn_qkv.lora_down"
        in report
    )
    assert "    single_transformer_blocks.N.proj_mlp (N = 0): LoRA, rank 4" in report
    assert "    norm_out.linear: LoRA, rank 2" in report
    assert "  T5, not applied (LoRAs apply to the transformer): 1 tensors on\n" in report
    assert "    lora_te3_encoder_block_N_layer_0_SelfAttention_q (N = 0)" in report


@pytest.mark.parametrize(
    ("file", "message"),
    [
        (
            tensors("lora_unet_single_blocks_0_linear1.lora_down.weight")
            | tensors("lora_unet_single_blocks_0_linear1.lora_up.weight", shape=(224 + 50, 4)),
            "lora_unet_single_blocks_0_linear1 updates 274 rows, and the fused layer it names has 224",
        ),
        (
            tensors("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff", shape=(16,))
            | tensors("transformer.transformer_blocks.0.attn.norm_q.diff", shape=(16,)),
            "update transformer_blocks.0.attn.norm_q; a file that updates a layer twice is ambiguous",
        ),
        (
            tensors(f"{Q}.lora_magnitude_vector", shape=(32,)),
            "has a DoRA magnitude and no update (LoRA, LoKr, LoHa or difference) to apply it to",
        ),
        (tensors(f"{BLOCK}.lokr_w1"), "needs lokr_w2, or lokr_w2_a and lokr_w2_b; it has none of them"),
    ],
    ids=["fused rows too many", "a norm twice", "a magnitude alone", "half a LoKr"],
)
def test_a_file_that_does_not_add_up_is_refused_by_resolve_lora(
    tmp_path: Path, tiny_model_dir, monkeypatch, capsys, file, message
):
    monkeypatch.setenv("FLUX_MODEL_DIR", str(tiny_model_dir))
    path = tmp_path / "odd.safetensors"
    path.write_bytes(make_safetensors(file))
    assert main(["resolve-lora", "--file", str(path)]) == 2
    assert message in capsys.readouterr().err
