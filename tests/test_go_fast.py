"""go_fast through the real server: on this CPU the fp8 weight-only path really runs."""

from __future__ import annotations

from PIL import Image

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.testing import tiny
from tests.conftest import image_data_uri, output_images, predict_ok

FAST = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "seed": 5, "output_format": "png"}


def image(server: CogServer, **inputs) -> tuple[bytes, str]:
    body = predict_ok(server, **{**FAST, **inputs})
    return output_images(body)[0][1], body["logs"]


def test_go_fast_runs_fp8_and_says_so(server: CogServer):
    bf, _ = image(server)
    fp8, logs = image(server, go_fast=True)
    assert "go_fast: fp8 weight-only" in logs
    assert fp8 != bf
    again, _ = image(server, go_fast=True)
    assert again == fp8  # deterministic, and the copy is made once


def test_go_fast_for_schnell_too(server: CogServer):
    bf, _ = image(server, model="schnell")
    fp8, logs = image(server, model="schnell", go_fast=True)
    assert fp8 != bf and "go_fast: fp8 weight-only" in logs


def test_custom_sizes_run_in_the_base_dtype(server: CogServer):
    custom = {"aspect_ratio": "custom", "width": 320, "height": 256}
    bf, _ = image(server, **custom)
    same, logs = image(server, go_fast=True, **custom)
    assert same == bf
    assert "go_fast: custom sizes run in float32, as the schema says" in logs
    assert "fp8" not in logs


def test_img2img_and_inpaint_get_go_fast(server: CogServer):
    source = image_data_uri(Image.new("RGB", (256, 256), (40, 90, 200)))
    mask = image_data_uri(Image.new("L", (256, 256), 255))
    for extra in ({}, {"mask": mask}):
        bf, _ = image(server, image=source, **extra)
        fp8, logs = image(server, image=source, go_fast=True, **extra)
        assert fp8 != bf and "go_fast: fp8 weight-only" in logs


def test_lora_on_the_fp8_transformer(server: CogServer):
    lora = bytes_to_data_uri(tiny.random_lora(seed=3))
    base, _ = image(server, go_fast=True)
    with_lora, logs = image(server, go_fast=True, replicate_weights=lora)
    assert with_lora != base and "go_fast: LoRA scales x1.5" in logs
    zero, _ = image(server, go_fast=True, replicate_weights=lora, lora_scale=0)
    assert zero == base
    assert image(server, go_fast=True)[0] == base  # unloaded: exactly the fp8 base again


def test_fp8_copy_made_while_a_lora_is_loaded_starts_from_the_base(
    server: CogServer, tiny_model_dir, tmp_path
):
    """The copy is made on first go_fast use: a LoRA active on the bf16 transformer then must
    not leak into it."""
    env = {"FLUX_MODEL_DIR": str(tiny_model_dir), "FLUX_LORA_CACHE_DIR": str(tmp_path)}
    lora = bytes_to_data_uri(tiny.random_lora(seed=4))
    with CogServer(env=env) as fresh:
        assert fresh.start()["status"] == "READY"
        predict_ok(fresh, **FAST, replicate_weights=lora)  # loaded into the bf16 transformer
        fast_base, _ = image(fresh, go_fast=True)  # the fp8 copy is made now
        fast_lora, _ = image(fresh, go_fast=True, replicate_weights=lora)
    assert fast_lora != fast_base
    assert fast_base == image(server, go_fast=True)[0]  # made with no LoRA loaded
