"""The picture grid of demo/README.md: what the trained demo model draws in each mode, at 256 px.

    ./scripts/demo-grid [--model demo] [--out docs/demo-grid.png]

Rows: [dev] at 28 steps, [schnell] at 4, [dev] with the stripes LoRA, an img2img input (a
jittered render) and its output at prompt_strength 0.3, an inpaint input (the mask's box drawn
on it) and its output under another prompt. Columns: four scenes, one of each shape. Every image
comes from our own loader and `FluxPipelines.generate`, as the server makes them; tiles are
halved for the page.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from demo_model import architecture, world
from demo_model.world import Scene
from flux_lora.lora.adapters import AdapterSet, WantedAdapter
from flux_lora.models.layout import DEMO_MODEL_DIR, ModelSource
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest

SIZE = architecture.IMAGE_SIZE
TILE = SIZE // 2
LABEL_WIDTH = 150
SCENES = (
    Scene("circle", "red", "blue"),
    Scene("square", "yellow", "black"),
    Scene("triangle", "green", "white"),
    Scene("cross", "blue", "white"),
)
# Each inpaint repaints the centred shape as another scene on the same background.
INPAINT_TARGETS = (
    Scene("cross", "yellow", "blue"),
    Scene("circle", "green", "black"),
    Scene("square", "red", "white"),
    Scene("triangle", "yellow", "white"),
)
GUIDANCE = 3.5
SEED = 3


def make_grid(root: Path) -> Image.Image:
    pipelines = FluxPipelines.load(ModelSource(Path(root)), torch.device("cpu"))
    rows: list[tuple[str, list[Image.Image]]] = [
        ("[dev], 28 steps", [_draw(pipelines, scene, "dev", 28) for scene in SCENES]),
        ("[schnell], 4 steps", [_draw(pipelines, scene, "schnell", 4) for scene in SCENES]),
    ]
    adapters = AdapterSet(pipelines.variant("dev").txt2img.transformer)
    lora = Path(root) / architecture.LORA_FILE
    try:
        adapters.activate([WantedAdapter("demo-stripes", str(lora), 1.0, "lora_weights", lora.name)])
        rows.append(("[dev] + stripes LoRA", [_draw(pipelines, scene, "dev", 28) for scene in SCENES]))
    finally:
        adapters.activate([])
    sources = [world.render(s, SIZE, rng=np.random.default_rng(i)) for i, s in enumerate(SCENES)]
    rows.append(("img2img input", sources))
    rows.append(
        (
            "img2img, strength 0.3",
            [
                _draw(pipelines, s, "dev", 28, image=i, strength=0.3)
                for s, i in zip(SCENES, sources, strict=True)
            ],
        )
    )
    box = world.layout(SIZE)
    mask = Image.new("RGB", (SIZE, SIZE), "black")
    ImageDraw.Draw(mask).rectangle(_corners(box), fill="white")
    centred = [world.render(scene, SIZE) for scene in SCENES]
    rows.append(("inpaint input + mask", [_outlined(image, box) for image in centred]))
    rows.append(
        (
            "inpaint, new prompt",
            [
                _draw(pipelines, target, "dev", 28, image=image, mask=mask, strength=0.8)
                for target, image in zip(INPAINT_TARGETS, centred, strict=True)
            ],
        )
    )
    return _compose(rows)


def _draw(
    pipelines: FluxPipelines, scene: Scene, variant: str, steps: int, *, strength: float = 0.8, **inputs
):
    request = GenerationRequest(
        prompt=scene.prompt,
        model=variant,
        num_inference_steps=steps,
        guidance_scale=GUIDANCE,
        prompt_strength=strength,
    )
    (image,) = pipelines.generate(request, size=(SIZE, SIZE), seed=SEED, **inputs)
    return image


def _corners(box: world.Box) -> tuple[float, float, float, float]:
    return box.left, box.top, box.left + box.width - 1, box.top + box.height - 1


def _outlined(image: Image.Image, box: world.Box) -> Image.Image:
    image = image.copy()
    ImageDraw.Draw(image).rectangle(_corners(box), outline=(255, 0, 255), width=3)
    return image


def _compose(rows: list[tuple[str, list[Image.Image]]]) -> Image.Image:
    columns = len(SCENES)
    header = 28
    grid = Image.new("RGB", (LABEL_WIDTH + columns * TILE, header + len(rows) * TILE), "white")
    draw = ImageDraw.Draw(grid)
    for column, scene in enumerate(SCENES):
        words = f"{scene.colour} {scene.shape} / {scene.background}"
        draw.text((LABEL_WIDTH + column * TILE + 4, 8), words, fill="black")
    for row, (label, images) in enumerate(rows):
        top = header + row * TILE
        draw.text((6, top + TILE // 2 - 6), label, fill="black")
        for column, image in enumerate(images):
            grid.paste(
                image.resize((TILE, TILE), Image.Resampling.LANCZOS), (LABEL_WIDTH + column * TILE, top)
            )
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo-grid", description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=DEMO_MODEL_DIR)
    parser.add_argument("--out", type=Path, default=Path("docs/demo-grid.png"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours are plenty for flat shapes, and half the bytes.
    make_grid(args.model).quantize(256).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
