"""Decoding the img2img/inpaint inputs into what the pipelines take."""

from __future__ import annotations

import os

from PIL import Image, ImageOps, UnidentifiedImageError

from flux_lora.errors import InputError
from flux_lora.schema import fit_input_size


def load_image(path: os.PathLike, name: str = "image") -> Image.Image:
    """An RGB image, EXIF orientation applied, scaled to fit the size bound (sides /16)."""
    image = _open(path, name).convert("RGB")
    return image.resize(fit_input_size(*image.size), Image.Resampling.LANCZOS)


def load_mask(path: os.PathLike, size: tuple[int, int]) -> Image.Image:
    """A greyscale mask resized to the image's size: white is repainted, black is kept."""
    mask = _open(path, "mask").convert("L")
    return mask.resize(size, Image.Resampling.LANCZOS)


def _open(path: os.PathLike, name: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError) as err:
        raise InputError(
            f"{name}: the file could not be read as an image ({err.__class__.__name__}). "
            "Send a PNG, JPEG or WebP file."
        ) from err
