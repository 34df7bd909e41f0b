"""The sample inputs of the README's img2img and inpaint examples: a picture from the demo world
and a mask over its shape, at 256x256, the size the demo model draws (img2img keeps the input's).

    python -m demo_model.inputs     # writes demo/inputs/ again (the files are committed)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from demo_model import world
from demo_model.world import Scene
from flux_lora.models.layout import DEMO_MODEL_DIR

INPUTS_DIR = DEMO_MODEL_DIR / "inputs"
SIZE = (256, 256)
SOURCE = Scene("circle", "red", "white")
MASK_MARGIN = 1 / 16  # of the side, around the shape's box: the anti-aliased edge is repainted too
FILES = {"image": "red-circle.png", "mask": "circle-mask.png"}


def source_image() -> Image.Image:
    """The centred red circle on white."""
    return world.render(SOURCE, SIZE)


def mask_image() -> Image.Image:
    """White (repainted) over the circle's box and a margin around it, black (kept) elsewhere."""
    width, height = SIZE
    box = world.layout(SIZE)
    margin = MASK_MARGIN * min(SIZE)
    top, left = round(box.top - margin), round(box.left - margin)
    bottom, right = round(box.top + box.height + margin), round(box.left + box.width + margin)
    pixels = np.zeros((height, width), np.uint8)
    pixels[top:bottom, left:right] = 255
    return Image.fromarray(pixels, "L")


def write(folder: Path = INPUTS_DIR) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / file for name, file in FILES.items()}
    source_image().save(paths["image"], optimize=True)
    mask_image().save(paths["mask"], optimize=True)
    return paths


if __name__ == "__main__":
    for path in write().values():
        print(path)
    sys.exit(0)
