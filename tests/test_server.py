"""The container through the real Cog server over HTTP, on the tiny model."""

from __future__ import annotations

import json
import re

import pytest
from PIL import Image

from flux_lora.dev.cog_server import CogServer
from flux_lora.dev.openapi import SCHEMA_PATH
from flux_lora.models.layout import REPO_ROOT
from flux_lora.schema import ASPECT_RATIOS
from tests.conftest import (
    NO_SERVICES,
    becomes_ready,
    image_data_uri,
    open_image,
    output_images,
    predict_failed,
    predict_ok,
)

FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 7}


def test_health_check_is_ready_after_setup(server: CogServer):
    assert becomes_ready(server)
    health = server.get("/health-check")
    assert "FLUX.1-schnell/vae: identical to FLUX.1-dev's, shared" in health["setup"]["logs"]


def test_openapi_served_is_our_committed_schema(server: CogServer):
    # coglet serves the file re-serialised with sorted keys: compare as data, not text.
    committed = json.loads((REPO_ROOT / SCHEMA_PATH).read_text())
    assert server.get("/openapi.json") == committed


@pytest.mark.parametrize("aspect_ratio", list(ASPECT_RATIOS))
def test_each_aspect_ratio_at_quarter_megapixel_has_its_exact_size(server: CogServer, aspect_ratio: str):
    body = predict_ok(server, prompt="a cat", aspect_ratio=aspect_ratio, **FAST)
    [(_, data)] = output_images(body)
    width, height = ASPECT_RATIOS[aspect_ratio]
    assert open_image(data).size == (width // 2, height // 2)


def test_one_megapixel_is_the_table_size(server: CogServer):
    body = predict_ok(server, prompt="a cat", aspect_ratio="21:9", num_inference_steps=1, seed=1)
    assert open_image(output_images(body)[0][1]).size == (1536, 640)


@pytest.mark.parametrize(
    ("width", "height", "expected"), [(1000, 300, (1008, 304)), (257, 1439, (256, 1440))]
)
def test_custom_size_rounds_to_nearest_multiple_of_16(server: CogServer, width, height, expected):
    body = predict_ok(server, prompt="a cat", aspect_ratio="custom", width=width, height=height, **FAST)
    assert open_image(output_images(body)[0][1]).size == expected


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_num_outputs_gives_that_many_distinct_images(server: CogServer, count: int):
    images = output_images(predict_ok(server, prompt="a cat", num_outputs=count, **FAST))
    assert len(images) == count
    assert len({data for _, data in images}) == count


@pytest.mark.parametrize(
    ("fmt", "mime", "pil_format"),
    [("webp", "image/webp", "WEBP"), ("jpg", "image/jpeg", "JPEG"), ("png", "image/png", "PNG")],
)
def test_output_format(server: CogServer, fmt: str, mime: str, pil_format: str):
    [(got_mime, data)] = output_images(predict_ok(server, prompt="a cat", output_format=fmt, **FAST))
    assert got_mime == mime
    assert open_image(data).format == pil_format


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_output_quality_changes_file_size(server: CogServer, fmt: str):
    sizes = {}
    for quality in (10, 95):
        [(_, data)] = output_images(
            predict_ok(server, prompt="a cat", output_format=fmt, output_quality=quality, **FAST)
        )
        sizes[quality] = len(data)
    assert sizes[10] < sizes[95]


def test_png_ignores_quality(server: CogServer):
    files = [
        output_images(predict_ok(server, prompt="a cat", output_format="png", output_quality=q, **FAST))[0][1]
        for q in (10, 95)
    ]
    assert files[0] == files[1]


def test_same_seed_gives_identical_files_and_another_seed_does_not(server: CogServer):
    inputs = {"prompt": "a cat", "num_inference_steps": 2, "megapixels": "0.25", "num_outputs": 2}
    first = output_images(predict_ok(server, seed=42, **inputs))
    again = output_images(predict_ok(server, seed=42, **inputs))
    other = output_images(predict_ok(server, seed=43, **inputs))
    assert first == again
    assert first != other


def test_random_seed_is_logged_and_reproduces_the_image(server: CogServer):
    inputs = {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25"}
    body = predict_ok(server, **inputs)
    seed = int(re.search(r"Using seed: (\d+)", body["logs"])[1])
    assert output_images(predict_ok(server, seed=seed, **inputs)) == output_images(body)


def test_prompt_changes_the_image(server: CogServer):
    cat = output_images(predict_ok(server, prompt="a cat", **FAST))
    dog = output_images(predict_ok(server, prompt="a red dog", **FAST))
    assert cat != dog


def test_guidance_is_honoured_by_dev_and_absent_from_schnell(server: CogServer):
    def image(model: str, guidance: float) -> bytes:
        body = predict_ok(
            server, prompt="a cat", model=model, guidance_scale=guidance, output_format="png", **FAST
        )
        return output_images(body)[0][1]

    assert image("dev", 0) != image("dev", 10)
    assert image("schnell", 0) == image("schnell", 10)
    assert image("dev", 3) != image("schnell", 3)


def test_num_inference_steps_is_honoured(server: CogServer):
    one = output_images(predict_ok(server, prompt="a cat", **FAST))
    two = output_images(predict_ok(server, prompt="a cat", **{**FAST, "num_inference_steps": 2}))
    assert one != two


@pytest.mark.parametrize(
    ("size", "expected"), [((300, 200), (304, 208)), ((2000, 1000), (1440, 720)), ((900, 1600), (816, 1440))]
)
def test_img2img_output_keeps_the_input_aspect_within_1440(server: CogServer, size, expected):
    source = Image.new("RGB", size, (200, 30, 30))
    body = predict_ok(
        server,
        prompt="a cat",
        image=image_data_uri(source),
        aspect_ratio="16:9",
        num_inference_steps=2,
        seed=3,
    )
    assert open_image(output_images(body)[0][1]).size == expected
    assert "img2img" in body["logs"]


def test_img2img_prompt_strength_is_honoured(server: CogServer):
    source = image_data_uri(Image.new("RGB", (256, 256), (10, 200, 30)))

    def run(strength: float) -> bytes:
        body = predict_ok(
            server, prompt="a cat", image=source, prompt_strength=strength, num_inference_steps=4, seed=3
        )
        return output_images(body)[0][1]

    assert run(0.5) != run(1.0)


def test_inpaint_resizes_the_mask_to_the_image(server: CogServer):
    source = Image.new("RGB", (320, 240), (30, 30, 200))
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (16, 12, 48, 36))
    body = predict_ok(
        server,
        prompt="a cat",
        image=image_data_uri(source),
        mask=image_data_uri(mask),
        num_inference_steps=2,
        seed=3,
    )
    assert open_image(output_images(body)[0][1]).size == (320, 240)
    assert "inpaint" in body["logs"]


def test_inpaint_differs_from_img2img(server: CogServer):
    source = image_data_uri(Image.new("RGB", (256, 256), (30, 30, 200)))
    half = Image.new("L", (256, 256), 0)
    half.paste(255, (0, 0, 128, 256))
    common = {"prompt": "a cat", "image": source, "num_inference_steps": 2, "seed": 3}
    img2img = output_images(predict_ok(server, **common))
    inpaint = output_images(predict_ok(server, mask=image_data_uri(half), **common))
    assert img2img != inpaint


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("num_outputs", 5),
        ("num_outputs", 0),
        ("width", 100),
        ("height", 2000),
        ("guidance_scale", 10.5),
        ("prompt_strength", 1.5),
        ("num_inference_steps", 51),
        ("output_quality", 101),
        ("lora_scale", 3.5),
        ("extra_lora_scale", -2),
        ("aspect_ratio", "7:3"),
        ("model", "pro"),
        ("output_format", "gif"),
        ("megapixels", "2"),
        ("seed", None),
        ("go_fast", "yes"),
    ],
)
def test_out_of_range_and_unknown_choices_are_422(server: CogServer, name: str, value):
    status, body = server.predict({"prompt": "a cat", name: value})
    assert status == 422, body
    assert any(name in detail["loc"] for detail in body["detail"]), body


def test_missing_prompt_is_422(server: CogServer):
    status, body = server.predict({"seed": 1})
    assert status == 422
    assert "prompt" in str(body["detail"])


@pytest.mark.parametrize(
    ("inputs", "fragments"),
    [
        (
            {"aspect_ratio": "custom", "width": 512},
            ["aspect_ratio", "height is missing", "Send width and height"],
        ),
        ({"aspect_ratio": "custom"}, ["aspect_ratio", "width and height are missing"]),
        ({"mask": "MASK"}, ["mask:", "without an image", "send `image` too"]),
        ({"image": "/etc/passwd"}, ["image: '/etc/passwd' is not a URL", "data: URI"]),
        (
            {"image": "IMAGE", "prompt_strength": 0.02},
            ["prompt_strength: 0.02", "no denoising step", ">= 0.036"],
        ),
        ({"image": "NOT_AN_IMAGE"}, ["image: the 5 bytes received (they begin b'hello') are not an image"]),
        (
            {"image": "EMPTY"},
            ["image: data:image/png;base64,... (22 characters) holds no bytes", "base64-encoded"],
        ),
    ],
)
def test_cross_field_errors_fail_precisely_and_the_next_request_works(server: CogServer, inputs, fragments):
    image = image_data_uri(Image.new("RGB", (64, 64)))
    replacements = {
        "MASK": image,
        "IMAGE": image,
        "NOT_AN_IMAGE": "data:image/png;base64,aGVsbG8=",
        "EMPTY": "data:image/png;base64,",
    }
    inputs = {key: replacements.get(value, value) for key, value in inputs.items()}
    error = predict_failed(server, prompt="a cat", **inputs)
    for fragment in fragments:
        assert error.count(fragment) == 1, error  # said once
    assert not re.search(r"object at 0x|<_io\.", error), error  # no reprs of our objects
    predict_ok(server, prompt="a cat", **FAST)


def test_setup_fails_readably_when_the_model_folder_is_missing(tmp_path):
    missing = tmp_path / "no-such-folder"
    env = {"FLUX_MODEL_DIR": str(missing), "HF_TOKEN": "", **NO_SERVICES}
    with CogServer(env=env) as cog:
        health = cog.start()
        assert health["status"] == "SETUP_FAILED"
        assert f"{missing} does not hold FLUX.1-dev, FLUX.1-schnell" in health["setup"]["logs"]
        status, _ = cog.predict({"prompt": "a cat"})
        assert status != 200


@pytest.mark.parametrize(
    ("inputs", "line"),
    [
        (
            {"width": 640, "height": 480},
            "width=640, height=480: not used: width and height apply only with aspect_ratio=custom; "
            "this picture is 512x512 (aspect_ratio=1:1, megapixels=0.25)",
        ),
        (
            {"aspect_ratio": "custom", "width": 256, "height": 256},
            "megapixels=0.25: not used with aspect_ratio=custom: width and height set the size (256x256)",
        ),
        (
            {"image": "IMAGE", "aspect_ratio": "16:9", "width": 512, "prompt_strength": 1.0},
            "width=512, aspect_ratio=16:9, megapixels=0.25: not used with an image: the output takes the "
            "input image's size (64x48)",
        ),
    ],
    ids=["size-without-custom", "megapixels-with-custom", "size-with-an-image"],
)
def test_a_size_input_the_request_does_not_use_gets_one_log_line(server: CogServer, inputs: dict, line: str):
    """The schema accepts these together; a user who set one expects it to count, so the log says
    it did not, once, and the prediction still runs."""
    image = image_data_uri(Image.new("RGB", (64, 48), (20, 200, 30)))
    inputs = {key: image if value == "IMAGE" else value for key, value in inputs.items()}
    body = predict_ok(server, prompt="a cat", **FAST, **inputs)
    assert body["logs"].count(line) == 1, body["logs"]
    assert body["logs"].count("not used") == 1


def test_a_plain_request_logs_no_unused_input_and_no_demo_note(server: CogServer):
    """The tiny model has no world.json: no line about what it knows."""
    logs = predict_ok(server, prompt="a cat", **FAST)["logs"]
    assert "not used" not in logs and "Demo model" not in logs, logs


def test_an_unknown_input_name_is_dropped_by_coglet_and_named_in_its_log(server: CogServer):
    """What docs/behaviour.md says: coglet strips `num_output` before our code runs (one image,
    200) and names it in its own log; the prediction's log cannot, since run() never sees it."""
    body = predict_ok(server, prompt="a cat", num_output=2, **FAST)
    assert len(output_images(body)) == 1
    stripped = [
        json.loads(line)["fields"]
        for line in server.log_path.read_text().splitlines()
        if "Stripped unknown input fields" in line
    ]
    assert any("num_output" in entry["fields"] for entry in stripped), stripped
