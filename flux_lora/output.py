"""Saving generated images in the requested format and quality."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# output_format -> Pillow's format name
PIL_FORMATS = {"webp": "WEBP", "jpg": "JPEG", "png": "PNG"}


def save_images(images: list[Image.Image], folder: Path, output_format: str, quality: int) -> list[Path]:
    """Write `out-0.<ext>`, `out-1.<ext>`, ... into `folder`; quality is ignored for png."""
    pil_format = PIL_FORMATS[output_format]
    options = {} if pil_format == "PNG" else {"quality": quality}
    paths = []
    for index, image in enumerate(images):
        path = folder / f"out-{index}.{output_format}"
        image.save(path, format=pil_format, **options)
        paths.append(path)
    return paths
