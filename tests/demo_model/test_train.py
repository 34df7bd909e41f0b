"""`scripts/train-demo --quick`: every training stage for a few steps, and what it writes loads
through our own loader like real FLUX and draws 256x256 images (the figures are not the point:
the weights have barely moved); `--widen` does stage 5 alone on a model saved without it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from demo_model import architecture, positions, quality, widen, world
from flux_lora.models.layout import REPO_ROOT, ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest

REPO = REPO_ROOT


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "model"
    subprocess.run(["./scripts/train-demo", "--quick", "--out", str(out)], cwd=REPO, check=True, timeout=120)
    return out


@pytest.mark.slow
def test_quick_run_writes_the_flux_layout_small(quick_model: Path):
    for release in ("FLUX.1-dev", "FLUX.1-schnell"):
        index = json.loads((quick_model / release / "model_index.json").read_text())
        assert index["_class_name"] == "FluxPipeline"
        assert all((quick_model / release / component).is_dir() for component in index if component[0] != "_")
    dev = json.loads((quick_model / "FLUX.1-dev/transformer/config.json").read_text())
    schnell = json.loads((quick_model / "FLUX.1-schnell/transformer/config.json").read_text())
    assert dev["guidance_embeds"] is True and schnell["guidance_embeds"] is False
    assert architecture.folder_size(quick_model) < 15_000_000
    record = json.loads((quick_model / architecture.RECORD_FILE).read_text())
    assert set(record["stage_seconds"]) >= {"vae", "text", "transformer", "lora", "widen"}
    # Training on compressed T5 padding computes what the pipeline's full padding does.
    assert all(entry["context_error"] < 1e-4 for entry in record["context"].values())
    lora = load_file(quick_model / architecture.LORA_FILE)
    assert lora and all(key.startswith("transformer.") for key in lora)
    assert {key.rsplit(".", 2)[-2] for key in lora} == {"lora_A", "lora_B"}


@pytest.mark.slow
def test_quick_model_loads_and_draws_256px(quick_model: Path):
    pipelines = FluxPipelines.load(ModelSource(quick_model), torch.device("cpu"))
    prompt = world.all_scenes()[0].prompt
    for variant in ("dev", "schnell"):
        request = GenerationRequest(prompt=prompt, model=variant, num_inference_steps=2)
        (image,) = pipelines.generate(request, size=(256, 256), seed=1)
        assert image.size == (256, 256)
    # Both releases run the same shared components; the latents are 16x16 (64 tokens).
    dev, schnell = pipelines.variant("dev").txt2img, pipelines.variant("schnell").txt2img
    assert dev.vae is schnell.vae and dev.text_encoder_2 is schnell.text_encoder_2
    assert dev.vae_scale_factor == 16


@pytest.mark.slow
def test_wide_vae_starts_from_the_core_and_keeps_its_latent_factors(quick_model: Path):
    from diffusers import AutoencoderKL

    core = architecture.new_core_vae(seed=0)
    core.register_to_config(shift_factor=0.1, scaling_factor=1.3)
    wide = widen.new_wide_vae(core, seed=0)
    assert (wide.config.shift_factor, wide.config.scaling_factor) == (0.1, 1.3)
    # The core's innermost encoder level is the wide VAE's, two levels further from the image.
    assert torch.equal(
        wide.encoder.down_blocks[4].resnets[0].conv1.weight,
        core.encoder.down_blocks[2].resnets[0].conv1.weight,
    )
    assert torch.equal(
        wide.decoder.up_blocks[2].resnets[0].conv1.weight, core.decoder.up_blocks[2].resnets[0].conv1.weight
    )
    assert torch.equal(
        wide.decoder.mid_block.attentions[0].to_q.weight, core.decoder.mid_block.attentions[0].to_q.weight
    )
    saved = AutoencoderKL.from_pretrained(quick_model / "FLUX.1-schnell" / "vae")
    assert saved.config.block_out_channels == list(architecture.VAE["block_out_channels"])


@pytest.mark.slow
def test_widen_alone_replaces_a_saved_core_vae(quick_model: Path, tmp_path: Path):
    """`--widen` on a model saved before stage 5 existed: both releases get the wide VAE."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(quick_model, model)
    core = architecture.new_core_vae(seed=0)
    core.register_to_config(shift_factor=-0.03, scaling_factor=1.06)
    architecture.replace_vae(model, core)
    subprocess.run(
        ["./scripts/train-demo", "--quick", "--widen", str(model)], cwd=REPO, check=True, timeout=120
    )
    for release in ("FLUX.1-dev", "FLUX.1-schnell"):
        config = json.loads((model / release / "vae" / "config.json").read_text())
        assert len(config["block_out_channels"]) == 5
        assert (config["shift_factor"], config["scaling_factor"]) == (-0.03, 1.06)
    record = json.loads((model / architecture.RECORD_FILE).read_text())
    assert {name: phase["steps"] for name, phase in record["widen"]["phases"].items()} == {
        "distil": 2,
        "robust": 2,
    }
    assert "widen" in record["stage_seconds"]
    # A second run refuses: the VAE is wide already.
    again = subprocess.run(
        ["./scripts/train-demo", "--quick", "--widen", str(model)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode != 0 and "already widened" in again.stderr


@pytest.mark.slow
def test_sizes_alone_retrains_the_transformers_and_the_lora_in_place(quick_model: Path, tmp_path: Path):
    """`--sizes` (stage 6) on a saved model: both transformers and the LoRA are rewritten, and
    world.json says what the model now knows."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(quick_model, model)
    before = {path: path.read_bytes() for path in model.glob("FLUX.1-*/transformer/*.safetensors")}
    before_lora = (model / architecture.LORA_FILE).read_bytes()
    subprocess.run(
        ["./scripts/train-demo", "--quick", "--sizes", str(model)], cwd=REPO, check=True, timeout=120
    )
    assert len(before) == 2 and all(path.read_bytes() != data for path, data in before.items())
    assert (model / architecture.LORA_FILE).read_bytes() != before_lora
    assert json.loads((model / "world.json").read_text())["example"] == "a red circle on a blue background"
    record = json.loads((model / architecture.RECORD_FILE).read_text())
    assert set(record["sizes"][-1]["pools"]) == {"256x256", "0.25 MP", "1 MP", "9:21"}
    assert record["sizes"][-1]["steps"] == {"transformer": 3, "lora": 2}
    for config in model.glob("FLUX.1-*/*/config.json"):  # no path of the machine that trained it
        assert "_name_or_path" not in json.loads(config.read_text()), config
    assert "sizes 1: sizes" in record["stage_seconds"]
    # the fast rotary pairs stay silent in what was saved: both transformers and the LoRA
    assert record["sizes"][-1]["silenced_channels_per_head"] == 8
    from diffusers import FluxTransformer2DModel

    for release in ("FLUX.1-dev", "FLUX.1-schnell"):
        saved = FluxTransformer2DModel.from_pretrained(model / release / "transformer")
        assert positions.silenced_rows_are_zero(saved), release
    rows = positions.silent_channels(saved).repeat(saved.config.num_attention_heads)
    ups = {
        key: value
        for key, value in load_file(model / architecture.LORA_FILE).items()
        if key.endswith(("to_k.lora_B.weight", "add_k_proj.lora_B.weight"))
    }
    assert len(ups) == 6  # 2 double blocks x 2 key projections, 2 single blocks x 1
    assert all(value[rows].abs().sum() == 0 and value[~rows].abs().sum() > 0 for value in ups.values())


@pytest.mark.slow
def test_quality_bench_runs_on_the_quick_model(quick_model: Path):
    record = quality.measure(
        quick_model, seeds=1, scenes=world.all_scenes()[:1], steps={"dev": 2, "schnell": 1}, ratios=["21:9"]
    )
    assert set(record) >= {"txt2img", "img2img", "inpaint", "lora", "sizes"}
    assert (record["sizes"]["scenes"], record["sizes"]["seeds"]) == (1, 1)
    assert set(record["sizes"]["1 MP"]) == {"21:9 1536x640"}
    assert set(record["sizes"]["0.25 MP"]["21:9 768x320"]) == {"dev", "schnell"}
    assert set(record["txt2img"]) == {"dev", "schnell"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch sees a GPU")
@pytest.mark.parametrize(("device", "says"), [("cuda", "sees no CUDA GPU"), ("gpu", "not a torch device")])
def test_a_device_this_torch_cannot_train_on_is_refused_before_any_work(
    tmp_path: Path, device: str, says: str
):
    out = tmp_path / "model"
    refused = subprocess.run(
        ["./scripts/train-demo", "--quick", "--device", device, "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2, refused.stderr
    assert f"--device {device}: " in refused.stderr and says in refused.stderr
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_a_gpu_writes_a_model_that_draws(tmp_path: Path):
    out = tmp_path / "model"
    subprocess.run(
        ["./scripts/train-demo", "--quick", "--device", "cuda", "--out", str(out)],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    record = json.loads((out / architecture.RECORD_FILE).read_text())
    assert record["settings"]["device"] == "cuda"
    assert set(record["stage_seconds"]) >= {"vae", "text", "transformer", "lora", "widen"}
    pipelines = FluxPipelines.load(ModelSource(out), torch.device("cpu"))
    request = GenerationRequest(prompt="a red circle on a blue background", num_inference_steps=2)
    (image,) = pipelines.generate(request, size=(architecture.IMAGE_SIZE, architecture.IMAGE_SIZE), seed=0)
    assert image.size == (architecture.IMAGE_SIZE, architecture.IMAGE_SIZE)
