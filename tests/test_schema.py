import pytest

from flux_lora.errors import InputError
from flux_lora.schema import (
    ASPECT_RATIO_CHOICES,
    ASPECT_RATIOS,
    GenerationRequest,
    check_request,
    fit_input_size,
    resolve_size,
    round_to_step,
)


def test_choices_come_from_the_size_table():
    assert [*ASPECT_RATIOS, "custom"] == ASPECT_RATIO_CHOICES
    assert len(ASPECT_RATIOS) == 11


@pytest.mark.parametrize(("ratio", "size"), ASPECT_RATIOS.items())
def test_presets_are_about_one_megapixel_in_multiples_of_16(ratio, size):
    width, height = size
    assert width % 16 == 0 and height % 16 == 0
    assert 0.85e6 < width * height < 1.1e6
    w, h = (int(part) for part in ratio.split(":"))
    assert abs(width / height - w / h) < 0.07


@pytest.mark.parametrize(("megapixels", "expected"), [("1", (1344, 768)), ("0.25", (672, 384))])
def test_megapixels_scale_the_preset(megapixels, expected):
    request = GenerationRequest(prompt="x", aspect_ratio="16:9", megapixels=megapixels)
    assert resolve_size(request) == expected


def test_custom_ignores_megapixels_and_rounds():
    request = GenerationRequest(prompt="x", aspect_ratio="custom", width=1000, height=1001, megapixels="0.25")
    assert resolve_size(request) == (1008, 1008)


@pytest.mark.parametrize(
    ("side", "rounded"), [(256, 256), (263, 256), (264, 272), (1000, 1008), (1440, 1440), (3, 16)]
)
def test_round_to_step(side, rounded):
    assert round_to_step(side) == rounded


@pytest.mark.parametrize(
    ("size", "fitted"),
    [
        ((1024, 1024), (1024, 1024)),
        ((300, 200), (304, 208)),
        ((4000, 3000), (1440, 1088)),  # 1080 is a half: up
        ((4000, 2990), (1440, 1072)),
        ((1441, 100), (1440, 96)),
    ],
)
def test_fit_input_size(size, fitted):
    assert fit_input_size(*size) == fitted


def test_presets_ignore_width_and_height():
    assert resolve_size(GenerationRequest(prompt="x", width=512, height=512)) == (1024, 1024)


IMAGE = "https://example.com/in.png"  # checked as text only: nothing is fetched


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"aspect_ratio": "custom", "height": 512},
            "aspect_ratio: 'custom' needs both width and height, but width is missing",
        ),
        ({"mask": IMAGE}, "mask: a mask was given without an image"),
        ({"image": "/etc/passwd"}, "image: '/etc/passwd' is not a URL"),
        ({"image": IMAGE, "mask": "x" * 200}, "mask: '" + "x" * 77 + "...' is not a URL"),
        (
            {"image": IMAGE, "prompt_strength": 0.0},
            "prompt_strength: 0.0 with num_inference_steps=28 leaves no denoising step",
        ),
        ({"seed": 2**64}, f"seed: {2**64} is out of range"),
    ],
)
def test_check_request_names_input_value_and_fix(fields, message):
    with pytest.raises(InputError) as caught:
        check_request(GenerationRequest(prompt="x", **fields))
    assert message in str(caught.value)
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"aspect_ratio": "custom", "width": 256, "height": 1440},
        {"image": IMAGE, "aspect_ratio": "custom"},  # image modes ignore the size inputs
        {"image": IMAGE, "mask": IMAGE, "prompt_strength": 1 / 28},
        {"seed": -1},
    ],
)
def test_check_request_accepts_valid_requests(fields):
    check_request(GenerationRequest(prompt="x", **fields))


def test_mode():
    assert GenerationRequest(prompt="x").mode == "txt2img"
    assert GenerationRequest(prompt="x", image=IMAGE).mode == "img2img"
    assert GenerationRequest(prompt="x", image=IMAGE, mask=IMAGE).mode == "inpaint"
