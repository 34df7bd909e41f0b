"""Bad and unusual inputs through the real Cog server: each fails precisely or works, and the
container serves the next request.

The tiny model's images are noise, so the colours an input decodes to are checked on
`flux_lora.images` directly; sizes, errors and logs are checked through the server.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.images import MASK_THRESHOLD, load_image, load_mask
from tests.conftest import image_data_uri, open_image, output_images, predict_failed, predict_ok

FAST = {"num_inference_steps": 1, "megapixels": "0.25", "seed": 7}
# img2img/inpaint with one step must run it whole: 0.8 x 1 step would leave none.
IMAGE_FAST = {"num_inference_steps": 1, "prompt_strength": 1.0, "seed": 7}
LONGEST_MESSAGE = 400  # an error or log line names the value, never repeats a huge one


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return bytes_to_data_uri(data, mime)


def png_bomb(width: int, height: int) -> bytes:
    """A real 1-bit PNG of `width` x `height` black pixels: a few kilobytes that declare (and would
    decode to) hundreds of megapixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1 bit, greyscale
    rows = zlib.compress(bytes((1 + (width + 7) // 8) * height), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    data = encode(Image.effect_noise((128, 128), 60))
    return data[: len(data) // 2]


def failure(server: CogServer, **inputs) -> str:
    """The predictor's message of a failed prediction (coglet prefixes it with
    "Prediction failed: Prediction failed: InputError: ")."""
    return predict_failed(server, **inputs).partition("InputError: ")[2]


def assert_next_request_works(server: CogServer) -> None:
    """A good image through the same path right after a bad one (the cheapest request, too)."""
    image = image_data_uri(Image.new("RGB", (64, 64), (200, 30, 30)))
    predict_ok(server, prompt="a cat", image=image, **IMAGE_FAST)


def inpaint(server: CogServer, image: Image.Image, mask: Image.Image, prompt: str = "a cat") -> dict:
    return predict_ok(
        server, prompt=prompt, image=image_data_uri(image), mask=image_data_uri(mask), **IMAGE_FAST
    )


# Bytes that are not an image, a truncated file, decompression bombs; as `image` and as `mask`.


@pytest.mark.parametrize(
    ("payload", "fragments"),
    [
        (
            b"hello, world",
            ["the 12 bytes received (they begin b'hello, w') are not an image", "Send a whole PNG"],
        ),
        (truncated_png(), ["the file could not be read as an image (OSError: image file is truncated"]),
        # 81 MP: under Pillow's own limit, over ours.
        (
            png_bomb(9000, 9000),
            ["too large to decode (9000x9000 = 81.0 megapixels declared; the limit is 64)"],
        ),
        # 400 MP: Pillow itself refuses it inside Image.open.
        (png_bomb(20000, 20000), ["too large to decode (400.0 megapixels declared; the limit is 64)"]),
    ],
    ids=["not-an-image", "truncated-png", "81-megapixels", "bomb-400-megapixels"],
)
@pytest.mark.parametrize("field", ["image", "mask"])
def test_unreadable_files_fail_precisely_and_the_next_request_works(
    server: CogServer, field: str, payload: bytes, fragments: list[str]
):
    inputs = {"image": image_data_uri(Image.new("RGB", (64, 64))), field: data_uri(payload)}
    error = failure(server, prompt="a cat", **inputs, **IMAGE_FAST)
    assert error.startswith(f"{field}: ")
    for fragment in fragments:
        assert fragment in error
    assert len(error) < LONGEST_MESSAGE
    assert "/tmp" not in error  # no server-side temporary path
    assert_next_request_works(server)


def test_bomb_is_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(9000, 9000))

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ValueError, match=r"^image: too large to decode \(9000x9000"):
        load_image(path)


@pytest.mark.parametrize("field", ["image", "mask"])
def test_a_local_path_is_refused_and_the_next_request_works(server: CogServer, field: str):
    inputs = {"image": image_data_uri(Image.new("RGB", (64, 64))), field: "/etc/passwd"}
    error = failure(server, prompt="a cat", **inputs, **IMAGE_FAST)
    assert error.startswith(f"{field}: '/etc/passwd' is not a URL.")
    assert "local paths on the server are never read" in error
    assert_next_request_works(server)


# Animated files: the first frame is used, and the log says so.


@pytest.mark.parametrize(("fmt", "mime"), [("GIF", "image/gif"), ("WEBP", "image/webp")])
def test_animated_image_uses_its_first_frame_and_logs_it(server: CogServer, tmp_path: Path, fmt, mime):
    frames = [Image.new("RGB", (96, 64), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    body = predict_ok(server, prompt="a cat", image=data_uri(data, mime), **IMAGE_FAST)
    assert "image: animated (3 frames): the first frame is used" in body["logs"]
    assert open_image(output_images(body)[0][1]).size == (96, 64)

    (tmp_path / "in").write_bytes(data)
    red, green, blue = load_image(tmp_path / "in").getpixel((10, 10))
    assert red > 200 and green < 50 and blue < 50


# Modes: each decodes to RGB of the input's size, with the colours a viewer would show.


def rgba_half_transparent() -> Image.Image:
    image = Image.new("RGBA", (96, 64), (0, 0, 0, 0))  # transparent black: must not come out black
    image.paste((255, 0, 0, 255), (0, 0, 48, 64))
    return image


def palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (96, 64), 0)
    image.putpalette([0, 0, 0, 0, 0, 255])  # index 0 black, index 1 blue
    image.paste(1, (0, 0, 48, 64))
    if transparent:
        image.info["transparency"] = 0
    return image


def sixteen_bit_grey() -> Image.Image:
    image = Image.new("I;16", (96, 64), 30000)  # 46% grey: 117 of 255, not white
    image.paste(65535, (0, 0, 48, 64))
    return image


def luminance_alpha() -> Image.Image:
    image = Image.new("LA", (96, 64), (0, 0))
    image.paste((0, 255), (0, 0, 48, 64))
    return image


# (name, file bytes, mime, the colour at the left half, the colour at the right half)
MODES = [
    (
        "CMYK-jpeg",
        lambda: encode(Image.new("CMYK", (96, 64), (0, 255, 255, 0)), "JPEG"),
        "image/jpeg",
        (255, 0, 0),
        (255, 0, 0),
    ),
    ("RGBA", lambda: encode(rgba_half_transparent()), "image/png", (255, 0, 0), (255, 255, 255)),
    ("LA", lambda: encode(luminance_alpha()), "image/png", (0, 0, 0), (255, 255, 255)),
    ("I;16", lambda: encode(sixteen_bit_grey()), "image/png", (255, 255, 255), (117, 117, 117)),
    ("P", lambda: encode(palette(transparent=False)), "image/png", (0, 0, 255), (0, 0, 0)),
    ("P-transparent", lambda: encode(palette(transparent=True)), "image/png", (0, 0, 255), (255, 255, 255)),
    (
        "RGBA-webp",
        lambda: encode(rgba_half_transparent(), "WEBP", lossless=True),
        "image/webp",
        (255, 0, 0),
        (255, 255, 255),
    ),
]


@pytest.mark.parametrize(("make", "mime", "left", "right"), [m[1:] for m in MODES], ids=[m[0] for m in MODES])
def test_every_mode_gives_rgb_of_the_right_size_and_colour(
    server: CogServer, tmp_path: Path, make, mime, left, right
):
    data = make()
    body = predict_ok(server, prompt="a cat", image=data_uri(data, mime), **IMAGE_FAST)
    assert open_image(output_images(body)[0][1]).size == (96, 64)

    (tmp_path / "in").write_bytes(data)
    decoded = load_image(tmp_path / "in")
    assert decoded.mode == "RGB" and decoded.size == (96, 64)
    for position, expected in (((10, 32), left), ((80, 32), right)):
        got = decoded.getpixel(position)
        assert all(abs(g - e) <= 8 for g, e in zip(got, expected, strict=True)), (position, got, expected)


def test_exif_orientation_is_honoured(server: CogServer, tmp_path: Path):
    stored = Image.new("RGB", (300, 200), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 60, 200))  # red on the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(stored, "JPEG", exif=exif.tobytes(), quality=95)
    body = predict_ok(server, prompt="a cat", image=data_uri(data, "image/jpeg"), **IMAGE_FAST)
    assert open_image(output_images(body)[0][1]).size == (208, 304)  # 200x300, sides to /16

    (tmp_path / "in.jpg").write_bytes(data)
    decoded = load_image(tmp_path / "in.jpg")
    assert decoded.size == (208, 304)
    assert decoded.getpixel((104, 10))[0] > 200  # the left edge is now the top
    assert decoded.getpixel((104, 290))[2] > 200


# Masks.


def test_mask_of_another_size_is_resized_to_the_image(server: CogServer, tmp_path: Path):
    mask = Image.new("L", (32, 20), 0)
    mask.paste(255, (0, 0, 16, 20))
    body = inpaint(server, Image.new("RGB", (96, 64), (30, 30, 200)), mask)
    assert open_image(output_images(body)[0][1]).size == (96, 64)

    mask.save(tmp_path / "mask.png")
    resized = load_mask(tmp_path / "mask.png", (96, 64))
    assert resized.size == (96, 64)
    assert resized.getpixel((10, 32)) == 255 and resized.getpixel((80, 32)) == 0


def test_grey_mask_is_thresholded_at_half(server: CogServer, tmp_path: Path):
    """Grey at or above 128 is repainted like white, darker grey kept like black: the same
    outputs, byte for byte. diffusers binarizes at 0.5 too; we do it first, in plain sight."""
    image = Image.new("RGB", (96, 64), (30, 30, 200))

    def mask(left: int, right: int) -> Image.Image:
        grey = Image.new("L", (96, 64), right)
        grey.paste(left, (0, 0, 48, 64))
        return grey

    def output(left: int, right: int) -> bytes:
        return output_images(inpaint(server, image, mask(left, right)))[0][1]

    assert output(MASK_THRESHOLD, MASK_THRESHOLD - 1) == output(255, 0)
    assert output(200, 100) == output(255, 0)
    assert output(200, 100) != output(0, 255)

    mask(200, 100).save(tmp_path / "mask.png")
    assert set(load_mask(tmp_path / "mask.png", (96, 64)).getdata()) == {0, 255}


def test_transparent_mask_areas_are_kept(tmp_path: Path):
    """White strokes on a transparent layer: the strokes are repainted, the rest kept."""
    mask = Image.new("RGBA", (96, 64), (255, 255, 255, 0))  # transparent white must not count
    mask.paste((255, 255, 255, 255), (0, 0, 48, 64))
    mask.save(tmp_path / "mask.png")
    loaded = load_mask(tmp_path / "mask.png", (96, 64))
    assert loaded.getpixel((10, 32)) == 255 and loaded.getpixel((80, 32)) == 0


@pytest.mark.parametrize("level", [0, 100])
def test_empty_mask_is_valid_and_logged_and_repaints_nothing(server: CogServer, level: int):
    """Nothing to repaint is a valid request (its result is the input through the VAE): it runs,
    the log says why the image did not change, and the prompt has no effect on the output."""
    image = Image.new("RGB", (96, 64), (30, 30, 200))
    empty = Image.new("L", (96, 64), level)
    cat, dog = (inpaint(server, image, empty, prompt) for prompt in ("a cat", "a red dog"))
    assert f"mask: nothing to repaint (brightest pixel {level}, below the threshold 128)" in cat["logs"]
    assert output_images(cat) == output_images(dog)

    half = Image.new("L", (96, 64), 0)
    half.paste(255, (0, 0, 48, 64))
    cat, dog = (inpaint(server, image, half, prompt) for prompt in ("a cat", "a red dog"))
    assert output_images(cat) != output_images(dog)
    assert "nothing to repaint" not in cat["logs"]


# Prompts.


@pytest.mark.parametrize(
    "prompt",
    ["", " ", "un café crème, s'il vous plaît", "猫が窓辺で眠る", "🐱🚀✨", "a cat 👩‍👩‍👧 ZWJ, RTL: قطة"],
)
def test_empty_unicode_and_emoji_prompts_work(server: CogServer, prompt: str):
    [(_, data)] = output_images(predict_ok(server, prompt=prompt, **FAST))
    assert open_image(data).size == (512, 512)


LONG_PROMPT = " ".join(["a red cat sitting on a blue mat"] * 90)  # 1,442 CLIP and 1,621 T5 tokens


@pytest.mark.parametrize("model", ["dev", "schnell"])
def test_over_long_prompt_is_not_an_error(server: CogServer, model: str):
    predict_ok(server, prompt=LONG_PROMPT, model=model, **FAST)
    assert_next_request_works(server)


@pytest.mark.parametrize(("model", "t5_tokens"), [("dev", 512), ("schnell", 256)])
def test_prompt_truncation_is_logged_in_one_short_line_per_encoder(server: CogServer, model, t5_tokens):
    logs = predict_ok(server, prompt=LONG_PROMPT, model=model, **FAST)["logs"]
    assert re.search(r"^Prompt truncated: CLIP keeps 77 of 1442 tokens$", logs, re.M), logs[:2000]
    assert re.search(rf"^Prompt truncated: T5 keeps {t5_tokens} of 1621 tokens$", logs, re.M), logs[:2000]
    assert "The following part of your input was truncated" not in logs  # diffusers' quote of it all
    assert max(map(len, logs.splitlines())) < LONGEST_MESSAGE
