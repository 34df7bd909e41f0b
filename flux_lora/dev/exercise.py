"""One small request down every serving path: both releases, bf16 and go_fast, txt2img, img2img
and inpaint, then one LoRA, two, and swaps. `inspect --exercise` runs them in-process; the dtype
tests send the same inputs to the real server. Without `replicate_weights` a request uses the
model's own LoRA (`COG_WEIGHTS`) when the container has one, so that path is exercised too.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import time

import torch
from PIL import Image, ImageDraw

log = logging.getLogger(__name__)

MODES = ("txt2img", "img2img", "inpaint")
IMAGE_SIDE = 256  # the schema's smallest side: img2img and inpaint run at the input's size
LORA_RANK = 2
LORA_TARGETS = ("to_q",)  # one layer a block: a LoRA of a few megabytes even at full size


def requests(loras: tuple[str, str]) -> list[tuple[str, dict[str, object]]]:
    """(label, inputs) for each request; `loras` are two LoRA references (data: URIs, say)."""
    image, mask = _image_uris()
    small = {"prompt": "a red circle", "num_inference_steps": 2, "seed": 1, "megapixels": "0.25"}
    out: list[tuple[str, dict[str, object]]] = []
    for model, go_fast, mode in itertools.product(("dev", "schnell"), (False, True), MODES):
        inputs = {**small, "model": model, "go_fast": go_fast}
        if mode != "txt2img":
            inputs["image"] = image
        if mode == "inpaint":
            inputs["mask"] = mask
        out.append((f"{model} {'go_fast' if go_fast else 'bf16'} {mode}", inputs))
    first, second = loras
    out += [
        ("dev bf16, one LoRA", {**small, "replicate_weights": first}),
        ("dev bf16, two LoRAs", {**small, "replicate_weights": first, "extra_lora": second}),
        (
            "dev go_fast, two LoRAs",
            {**small, "go_fast": True, "replicate_weights": first, "extra_lora": second},
        ),
        (
            "dev go_fast, swapped",
            {**small, "go_fast": True, "replicate_weights": second, "extra_lora": first},
        ),
        ("schnell bf16, a swap", {**small, "model": "schnell", "replicate_weights": second}),
        ("dev bf16, back to no LoRA", small),
    ]
    return out


def lora_uris(transformer: torch.nn.Module) -> tuple[str, str]:
    """Two small random LoRAs shaped for `transformer`, as data: URIs."""
    from flux_lora.testing import tiny

    return tuple(  # type: ignore[return-value]
        "data:application/octet-stream;base64,"
        + base64.b64encode(
            tiny.random_lora(seed=seed, rank=LORA_RANK, transformer=transformer, targets=LORA_TARGETS)
        ).decode()
        for seed in (1, 2)
    )


def run(service) -> list[dict[str, object]]:
    """Each request through `service.predict`; returns one line per request (label, seconds)."""
    from flux_lora.schema import GenerationRequest

    transformer = service.pipelines.variant("dev").txt2img.transformer
    results = []
    for label, inputs in requests(lora_uris(transformer)):
        started = time.perf_counter()
        service.predict(GenerationRequest(**inputs))
        seconds = time.perf_counter() - started
        log.info("exercise: %s in %.2f s", label, seconds)
        results.append({"request": label, "seconds": round(seconds, 3)})
    return results


def _image_uris() -> tuple[str, str]:
    """A square on grey and a mask of its middle, as PNG data: URIs."""
    image = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE), (128, 128, 128))
    ImageDraw.Draw(image).rectangle((64, 64, 192, 192), fill=(200, 40, 40))
    mask = Image.new("L", (IMAGE_SIDE, IMAGE_SIDE), 0)
    ImageDraw.Draw(mask).rectangle((96, 96, 160, 160), fill=255)
    return _png_uri(image), _png_uri(mask)


def _png_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
