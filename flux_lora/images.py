"""The `image` and `mask` inputs: fetched from http(s) and data: URLs, decoded for the pipelines.

Fetching. The predictors declare these inputs as URL strings, not `cog.Path`: cog would download a
Path input itself, before our code runs, with plain `requests` (no address policy, no size bound),
so any request could make the container fetch from its own network. Here an http(s) URL goes
through `SafeHttp`, the downloader every LoRA uses (public addresses only, checked again after each
redirect; bounded size; read timeouts), and a data: URL is decoded with the same size bound.

Decoding. Any format and mode Pillow reads becomes RGB of the input's size (EXIF orientation
applied): 16-bit greyscale is scaled to 8 bits, CMYK and palettes converted, transparency
composited.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from typing import BinaryIO

from PIL import Image, ImageOps

from flux_lora.errors import InputError
from flux_lora.http import SafeHttp, decode_data_url
from flux_lora.interrupt import Interrupt
from flux_lora.schema import MAX_IMAGE_SIDE, fit_input_size
from flux_lora.urls import is_fetchable_url, redact

log = logging.getLogger(__name__)

ImageFile = os.PathLike | BinaryIO  # a file, or the bytes ImageFetcher fetched

# A 1440 px photo is a few MB; 64 MiB admits the largest image we decode (64 MP, see
# MAX_INPUT_MEGAPIXELS) as a high-quality JPEG and stops a request from filling memory.
MAX_IMAGE_BYTES = 64 * 1024**2
# Declared size refused before decoding: inputs end at most 1440 px on a side, so more pixels only
# cost memory. 64 MP admits common camera photos (48-50 MP phones; 8K video frames are 33 MP), is at
# most 256 MB decoded, and is under Pillow's own bomb limit (89 MP, a warning), which never fires.
MAX_INPUT_MEGAPIXELS = 64
# Transparent areas become white in an image (what viewers show on a page), black in a mask
# (nothing painted there, so nothing repainted).
IMAGE_BACKGROUND = (255, 255, 255)
MASK_BACKGROUND = (0, 0, 0)
# Mask pixels this grey or brighter are repainted, darker ones kept. FluxInpaintPipeline binarizes
# at 0.5 anyway (its mask_processor has do_binarize=True); doing it here shows an empty mask.
MASK_THRESHOLD = 128
# 16-bit greyscale (PNG, TIFF) holds 0..65535: Pillow's convert would clip it to white, so scale it.
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
# Decoding failures that mean "not a (whole) image": truncated, corrupt, unknown format.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError)


def describe_image_url(value: str) -> str:
    """The input as it may appear in logs and messages: credentials out, data: URLs shortened."""
    if value.lower().startswith("data:"):
        return f"{value.split(',', 1)[0]},... ({len(value)} characters)"
    return redact(value)


class ImageFetcher:
    def __init__(self, http: SafeHttp, max_bytes: int = MAX_IMAGE_BYTES) -> None:
        self.http = http
        self.max_bytes = max_bytes

    def fetch(self, value: str, name: str, interrupt: Interrupt | None = None) -> io.BytesIO:
        """The bytes of the image `value` names; `name` ("image" or "mask") starts every message."""
        where = f"{name}: {describe_image_url(value)}"
        if not is_fetchable_url(value):  # check_request refuses these first; this keeps the rule local
            raise InputError(f"{where} is not an http(s) or data: URL")
        if value.lower().startswith("data:"):
            data = decode_data_url(value, where, self.max_bytes)
            if not data:
                raise InputError(
                    f"{where} holds no bytes after the comma. Put the file there, base64-encoded: "
                    "data:image/png;base64,iVBORw0KGgo..."
                )
            return io.BytesIO(data)
        started = time.monotonic()
        with self.http.get(value, where, limit=self.max_bytes, interrupt=interrupt) as body:
            data = body.read()
        log.info("%s: fetched %d bytes in %.2f s", where, len(data), time.monotonic() - started)
        if not data:
            raise InputError(
                f"{where}: the server sent an empty body (0 bytes). Check that the URL serves the image itself."
            )
        return io.BytesIO(data)


def load_image(path: ImageFile, name: str = "image") -> Image.Image:
    """RGB, EXIF orientation applied, scaled to fit the size bound (sides multiples of 16)."""
    image = _open(path, name, IMAGE_BACKGROUND)
    return image.resize(fit_input_size(*image.size), Image.Resampling.LANCZOS)


def load_mask(path: ImageFile, size: tuple[int, int]) -> Image.Image:
    """A black-and-white mask of the image's size: white is repainted, black is kept."""
    mask = _open(path, "mask", MASK_BACKGROUND).convert("L").resize(size, Image.Resampling.LANCZOS)
    brightest = mask.getextrema()[1]
    if brightest < MASK_THRESHOLD:
        log.info(
            "mask: nothing to repaint (brightest pixel %d, below the threshold %d): the output is the "
            "input image through the VAE. Paint the areas to repaint white (>= %d).",
            brightest,
            MASK_THRESHOLD,
            MASK_THRESHOLD,
        )
    return mask.point(lambda value: 255 if value >= MASK_THRESHOLD else 0)


def _open(path: ImageFile, name: str, background: tuple[int, int, int]) -> Image.Image:
    try:
        with Image.open(path) as image:
            _check_size(name, image.width * image.height, f"{image.width}x{image.height} = ")
            if getattr(image, "is_animated", False):
                log.info("%s: animated (%d frames): the first frame is used", name, image.n_frames)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image), background)
    except InputError:
        raise
    except Image.DecompressionBombError as err:  # over twice Pillow's limit: refused in open()
        found = re.search(r"\((\d+) pixels\)", str(err))  # "Image size (400000000 pixels) exceeds..."
        _check_size(name, int(found[1]) if found else 2 * (Image.MAX_IMAGE_PIXELS or 0))
        raise
    except Image.UnidentifiedImageError as err:
        raise InputError(
            f"{name}: {_first_bytes(path)} are not an image in any format Pillow reads. "
            "Send a whole PNG, JPEG or WebP file."
        ) from err
    except UNREADABLE as err:
        raise InputError(
            f"{name}: the file could not be read as an image ({err.__class__.__name__}: {_detail(err)}). "
            "Send a whole PNG, JPEG or WebP file."
        ) from err


def _first_bytes(path: ImageFile) -> str:
    """What a file that is not an image holds, e.g. "the 12 bytes received (they begin b'hello, w')"."""
    if hasattr(path, "read"):
        size = path.seek(0, io.SEEK_END)
        path.seek(0)
        head = path.read(8)
    else:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            head = file.read(8)
    return f"the {size} bytes received (they begin {head!r})"


def _detail(err: Exception) -> str:
    """Pillow's message without what names our side: a temporary file's path, an object's repr."""
    text = str(err).split(" '")[0]  # "... '/tmp/tmpab12.png'"
    return re.sub(r"<[^<>]* (object )?at 0x[0-9a-fA-F]+>", "the file", text)[:80]


def _check_size(name: str, pixels: int, sides: str = "") -> None:
    if pixels > MAX_INPUT_MEGAPIXELS * 1_000_000:
        raise InputError(
            f"{name}: too large to decode ({sides}{pixels / 1e6:.1f} megapixels declared; the limit is "
            f"{MAX_INPUT_MEGAPIXELS}). Send at most {MAX_INPUT_MEGAPIXELS} megapixels: inputs are scaled "
            f"down to fit {MAX_IMAGE_SIDE} px anyway."
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in SIXTEEN_BIT_MODES:
        image = image.point(lambda value: value / 256).convert("L")
    if not image.has_transparency_data:
        return image.convert("RGB")
    canvas = Image.new("RGBA", image.size, (*background, 255))
    return Image.alpha_composite(canvas, image.convert("RGBA")).convert("RGB")
