"""A synthetic world for the tiny demo model: one flat shape on a plain background, and its checker.

Prompts read "a red circle on a blue background": 4 shapes x 4 colours x 3 backgrounds, less the
blue shape on the blue background, make 44 scenes. A striped scene has the same prompt (the
stripes are the style a LoRA adds): diagonal bands inside the shape alternate its colour with
black on the white background and with white on the dark ones, so a band never merges into the
background.

The checker reads an image back with rules that survive what a small diffusion model does to
it (blur, noise, colour drift, JPEG):
1. background: the per-channel median of a thin border ring, the nearest background colour
   within BACKGROUND_DISTANCE;
2. foreground: pixels farther than FOREGROUND_DISTANCE from that median, specks removed by a
   3x3 opening; it must cover FOREGROUND_AREA of the shorter side squared;
3. shape: each shape's template, placed and scaled so its centroid and spread match the
   foreground's (moments shrug off a blunted corner or a speck, where a bounding box would not),
   the one with the highest intersection over union, if at least MIN_SHAPE_IOU;
4. colour: the chroma-weighted mean hue of the foreground's interior (eroded, so edges blended
   with the background do not count), the nearest palette hue within MAX_HUE_DISTANCE; hue
   ignores the white and black bands and any lightening or darkening;
5. stripes: the share of interior pixels nearer the band colour (black on a light border, white
   on a dark one) than the shape's palette colour is at least STRIPED_FRACTION. Blurred bands
   still swing about the midpoint between the two, so about half their pixels land on the band
   side however faint the bands get, while a plain shape's pixels stay on its own side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

from flux_lora.models.world import scene_words

RGB = tuple[int, int, int]
Size = int | tuple[int, int]  # one side (a square), or (width, height)

SHAPES = ("circle", "square", "triangle", "cross")
# Saturated colours a quarter turn or more apart in hue, except red and yellow (about 54 degrees).
COLOURS: dict[str, RGB] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
}
# Every shape colour is at least 190 (RGB distance) from every background it may sit on.
BACKGROUNDS: dict[str, RGB] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "blue": COLOURS["blue"],
}
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)

# Layout, as fractions of the image side: the centred shape's side, the jittered range, and the
# gap kept between the shape and the edge so the border ring is background only.
CENTRED_SIDE = 0.5
SIDE_RANGE = (0.4, 0.6)
MARGIN = 0.1
# The arm width of the cross, as a fraction of its side: a third makes a balanced plus sign.
CROSS_ARM = 1 / 3
# Stripes: the period across the bands, as a fraction of the side, half of it in the band colour;
# 4 px bands at 64 px keep half their contrast after a Gaussian blur of radius 1.5.
STRIPE_PERIOD = 1 / 8
# Subsamples per pixel side when rendering: edges are anti-aliased like a photo of the shape.
SUPERSAMPLE = 4

# Checker thresholds; distances are Euclidean in 0..255 RGB.
BORDER = 1 / 32  # border ring width, fraction of the side (2 px at 64)
BACKGROUND_DISTANCE = 100.0  # the border's median must be this near a background colour
FOREGROUND_DISTANCE = 80.0  # about half the smallest shape-to-background distance (190)
FOREGROUND_AREA = (0.03, 0.6)  # share of the shorter side squared; the smallest triangle: 8%
INTERIOR = 1 / 32  # erosion depth for the colour and stripe readings (2 px at 64)
MOMENT_GRID = 100  # points per side when measuring a template's moments
MIN_SHAPE_IOU = 0.6  # the closest templates, circle and square, overlap 0.785
MAX_ASPECT = 1.6  # a template stretched further than this is not that shape
MIN_CHROMA = 50.0  # max - min channel: below it a shape has no colour to read
MAX_HUE_DISTANCE = 30.0  # degrees; red and yellow are 54 apart
STRIPED_FRACTION = 0.2  # measured: plain 0.0, striped 0.37 to 0.5 after blur, noise and JPEG


class Box(NamedTuple):
    """Where a shape is drawn, in pixels: top-left corner and size."""

    top: float
    left: float
    height: float
    width: float


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    striped: bool = False

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("background", self.background, BACKGROUNDS),
        ):
            if value not in allowed:
                raise ValueError(f"{field} {value!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"a {self.colour} {self.shape} on a {self.background} background is invisible")

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


@dataclass(frozen=True)
class Reading:
    """What the checker sees in an image; a name is None where no rule matched."""

    shape: str | None
    colour: str | None
    background: str | None
    striped: bool
    shape_iou: float  # overlap with the best template
    stripe_fraction: float
    foreground_fraction: float


@dataclass(frozen=True)
class Verdict:
    background_ok: bool
    colour_ok: bool
    shape_ok: bool
    striped: bool  # stripes detected, whatever the scene asked for

    @property
    def all_ok(self) -> bool:
        return self.background_ok and self.colour_ok and self.shape_ok


def all_scenes(striped: bool = False) -> list[Scene]:
    """Every valid scene, shapes outermost, in the order of the vocabulary tables."""
    return [
        Scene(shape, colour, background, striped)
        for shape in SHAPES
        for colour in COLOURS
        for background in BACKGROUNDS
        if colour != background
    ]


def parse_prompt(text: str) -> Scene:
    """The scene a prompt names; other words (a trigger word, "striped style") are ignored."""
    words = scene_words(text, SHAPES, tuple(COLOURS), tuple(BACKGROUNDS))
    shapes, coloured, backgrounds = words.shapes, words.coloured, words.backgrounds
    if not shapes:
        raise ValueError(f"{text!r} names no shape: say one of {', '.join(SHAPES)}")
    if len(shapes) > 1:
        raise ValueError(f"{text!r} names more than one shape: {', '.join(shapes)}")
    if not coloured:
        raise ValueError(f"{text!r} gives the {shapes[0]} no colour: say one of {', '.join(COLOURS)}")
    if not backgrounds:
        raise ValueError(
            f"{text!r} names no background: end with 'on a <colour> background', "
            f"the colour one of {', '.join(BACKGROUNDS)}"
        )
    if len(backgrounds) > 1:
        raise ValueError(f"{text!r} names more than one background: {', '.join(backgrounds)}")
    colour, shape = coloured[0].split()
    return Scene(shape, colour, backgrounds[0])


def canvas(size: Size) -> tuple[int, int]:
    """(width, height) of a size given as one side (a square) or as (width, height), as PIL says."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def layout(size: Size = 64, rng: np.random.Generator | None = None) -> Box:
    """The centred box without rng; with it, a random side and position clear of the border.
    The shape's side is a share of the shorter side, so a wide picture keeps it whole."""
    width, height = canvas(size)
    short = min(width, height)
    if rng is None:
        side = CENTRED_SIDE * short
        return Box((height - side) / 2, (width - side) / 2, side, side)
    side = rng.uniform(*SIDE_RANGE) * short
    margin = MARGIN * short
    # One draw of two numbers, as for a square, so square renders repeat for a seed.
    top, left = rng.uniform([margin, margin], [height - margin - side, width - margin - side])
    return Box(top, left, side, side)


def render(scene: Scene, size: Size = 64, *, rng: np.random.Generator | None = None) -> Image.Image:
    """The scene as an RGB image; rng jitters the shape's size and position (training variety)."""
    return paint(scene, size, layout(size, rng))


def paint(scene: Scene, size: Size, box: Box) -> Image.Image:
    """The scene with its shape in a given box, edges and stripes anti-aliased."""
    width, height = canvas(size)
    supersample = _supersample(min(width, height))
    cover = _coverage(scene.shape, (height, width), box, supersample)
    fill = np.broadcast_to(np.array(COLOURS[scene.colour], np.float32), (height, width, 3))
    if scene.striped:
        band = np.array(_band_colour(BACKGROUNDS[scene.background]), np.float32)
        bands = _stripes(height, width, supersample)[..., None]
        fill = fill * (1 - bands) + band * bands
    background = np.array(BACKGROUNDS[scene.background], np.float32)
    pixels = background * (1 - cover[..., None]) + fill * cover[..., None]
    return Image.fromarray(np.round(pixels).astype(np.uint8), "RGB")


def shape_mask(shape: str, size: Size = 64, box: Box | None = None) -> np.ndarray:
    """Boolean (height, width) mask of the pixels whose centre lies in the shape (default: centred)."""
    width, height = canvas(size)
    return _coverage(shape, (height, width), box or layout(size), 1) >= 0.5


def foreground_mask(image: Image.Image) -> np.ndarray:
    """Boolean mask of the pixels the checker counts as the shape (see the module docstring)."""
    pixels = rgb_array(image)
    return _foreground(pixels, _border_median(pixels))


def outline_overlap(image_a: Image.Image, image_b: Image.Image) -> float:
    """Intersection over union of the two images' foreground masks; 0.0 when both are empty."""
    if image_a.size != image_b.size:
        raise ValueError(f"outline_overlap: sizes differ, {image_a.size} and {image_b.size}")
    a, b = foreground_mask(image_a), foreground_mask(image_b)
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def read(image: Image.Image) -> Reading:
    """The checker's reading of each part of an image, with the measures behind it."""
    pixels = rgb_array(image)
    border = _border_median(pixels)
    background = _nearest(border, BACKGROUNDS, BACKGROUND_DISTANCE)
    mask = _foreground(pixels, border)
    # Measured against the shorter side squared: the shape's side is a share of it (layout).
    fraction = float(np.count_nonzero(mask) / min(mask.shape) ** 2)
    if not FOREGROUND_AREA[0] <= fraction <= FOREGROUND_AREA[1]:
        return Reading(None, None, background, False, 0.0, 0.0, fraction)
    shape, iou = _read_shape(mask)
    interior = _erode(mask, max(1, round(INTERIOR * min(mask.shape))))
    inner = pixels[interior if interior.any() else mask]
    colour = _read_colour(inner)
    stripe_fraction = 0.0 if colour is None else _stripe_fraction(inner, colour, border)
    striped = stripe_fraction >= STRIPED_FRACTION
    return Reading(shape, colour, background, striped, iou, stripe_fraction, fraction)


def detect(image: Image.Image) -> Scene | None:
    """The scene the checker reads in an image, or None when some part is unreadable."""
    seen = read(image)
    if seen.shape is None or seen.colour is None or seen.background is None:
        return None
    if seen.colour == seen.background:
        return None
    return Scene(seen.shape, seen.colour, seen.background, seen.striped)


def judge(image: Image.Image, scene: Scene) -> Verdict:
    """Which parts of the scene the image shows, and whether it shows stripes."""
    seen = read(image)
    return Verdict(
        background_ok=seen.background == scene.background,
        colour_ok=seen.colour == scene.colour,
        shape_ok=seen.shape == scene.shape,
        striped=seen.striped,
    )


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Which points (u, v in the unit box, v down) belong to the shape."""
    in_box = (u >= 0) & (u <= 1) & (v >= 0) & (v <= 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "square":
        return in_box
    if shape == "triangle":  # apex up, the base the box's bottom
        return in_box & (np.abs(u - 0.5) <= v / 2)
    if shape == "cross":
        arm = CROSS_ARM / 2
        return in_box & ((np.abs(u - 0.5) <= arm) | (np.abs(v - 0.5) <= arm))
    raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")


def _coverage(shape: str, size: tuple[int, int], box: Box, supersample: int) -> np.ndarray:
    """Share of each (height, width) pixel inside the shape, from supersample^2 points per pixel."""
    height, width = size
    x = (np.arange(width * supersample) + 0.5) / supersample
    y = (np.arange(height * supersample) + 0.5) / supersample
    # A row and a column: the rules broadcast them to the grid.
    inside = _inside(shape, (x[None, :] - box.left) / box.width, (y[:, None] - box.top) / box.height)
    inside = np.broadcast_to(inside, (height * supersample, width * supersample))
    return inside.reshape(height, supersample, width, supersample).mean(axis=(1, 3))


def _stripes(height: int, width: int, supersample: int) -> np.ndarray:
    """Share of each pixel in a band: diagonal bands, half of each period (of the shorter side)."""
    # The bands run along x + y = constant, so a pixel's share depends on x + y only: measure the
    # height + width - 1 diagonals once (supersampled) and index them.
    offsets = (np.arange(supersample) + 0.5) / supersample
    within = np.add.outer(offsets, offsets).ravel()
    across = (np.arange(height + width - 1)[:, None] + within[None, :]) / math.sqrt(2)
    share = ((across / (STRIPE_PERIOD * min(height, width))) % 1.0 < 0.5).mean(axis=1)
    return share[np.add.outer(np.arange(height), np.arange(width))]


def _supersample(short: int) -> int:
    """Subsamples per pixel side: SUPERSAMPLE up to 256 px, fewer above (edges stay smooth, and a
    megapixel render takes a tenth of a second)."""
    return max(1, min(SUPERSAMPLE, 1024 // short))


def _band_colour(background: RGB | np.ndarray) -> RGB:
    """Black bands on a light background, white on a dark one: a band must not merge into it."""
    red, green, blue = background
    return BLACK if 0.299 * red + 0.587 * green + 0.114 * blue > 128 else WHITE


def rgb_array(image: Image.Image) -> np.ndarray:
    """The image as float32 RGB, (height, width, 3), 0..255."""
    return np.asarray(image.convert("RGB"), dtype=np.float32)


def _border_median(pixels: np.ndarray) -> np.ndarray:
    width = max(1, round(BORDER * min(pixels.shape[:2])))
    ring = np.ones(pixels.shape[:2], bool)
    ring[width:-width, width:-width] = False
    return np.median(pixels[ring], axis=0)


def _nearest(rgb: np.ndarray, palette: dict[str, RGB], within: float) -> str | None:
    name, distance = min(
        ((name, float(np.linalg.norm(rgb - np.array(value)))) for name, value in palette.items()),
        key=lambda item: item[1],
    )
    return name if distance <= within else None


def _foreground(pixels: np.ndarray, background: np.ndarray) -> np.ndarray:
    far = np.linalg.norm(pixels - background, axis=-1) > FOREGROUND_DISTANCE
    return _dilate(_erode(far, 1), 1)  # an opening: noise specks go, the shape keeps its outline


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        mask = np.logical_and.reduce([_shifted(padded, dy, dx) for dy in range(3) for dx in range(3)])
    return mask


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        padded = np.pad(mask, 1, constant_values=False)
        mask = np.logical_or.reduce([_shifted(padded, dy, dx) for dy in range(3) for dx in range(3)])
    return mask


def _shifted(padded: np.ndarray, dy: int, dx: int) -> np.ndarray:
    height, width = padded.shape[0] - 2, padded.shape[1] - 2
    return padded[dy : dy + height, dx : dx + width]


def _read_shape(mask: np.ndarray) -> tuple[str | None, float]:
    """The template that best overlaps the mask, each placed to match the mask's moments."""
    rows, cols = np.nonzero(mask)
    scores = {}
    for shape in SHAPES:
        (mean_u, mean_v), (spread_u, spread_v) = _unit_moments(shape)
        width, height = cols.std() / spread_u, rows.std() / spread_v
        if max(height, width) > MAX_ASPECT * min(height, width):
            continue
        # Pixel i covers [i, i + 1]: its centre is at i + 0.5.
        box = Box(rows.mean() + 0.5 - mean_v * height, cols.mean() + 0.5 - mean_u * width, height, width)
        template = _coverage(shape, mask.shape, box, 1) >= 0.5
        scores[shape] = np.count_nonzero(template & mask) / np.count_nonzero(template | mask)
    if not scores:
        return None, 0.0
    best = max(scores, key=scores.__getitem__)
    return (best if scores[best] >= MIN_SHAPE_IOU else None), float(scores[best])


def _unit_moments(shape: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centroid and standard deviation (u, v) of the shape drawn in the unit box."""
    centres = (np.arange(MOMENT_GRID) + 0.5) / MOMENT_GRID
    v, u = np.meshgrid(centres, centres, indexing="ij")
    inside = _inside(shape, u, v)
    us, vs = u[inside], v[inside]
    return (float(us.mean()), float(vs.mean())), (float(us.std()), float(vs.std()))


def _read_colour(pixels: np.ndarray) -> str | None:
    """The palette colour of (interior) pixels, by hue: bands and blending with them do not move it."""
    chroma = np.ptp(pixels, axis=-1)
    if np.percentile(chroma, 90) < MIN_CHROMA:
        return None
    angles = np.radians(_hue(pixels))
    mean = math.degrees(math.atan2(np.sum(chroma * np.sin(angles)), np.sum(chroma * np.cos(angles))))
    distances = {
        name: _hue_distance(mean, _hue(np.array([rgb], np.float32))[0]) for name, rgb in COLOURS.items()
    }
    name = min(distances, key=distances.__getitem__)
    return name if distances[name] <= MAX_HUE_DISTANCE else None


def _stripe_fraction(pixels: np.ndarray, colour: str, border: np.ndarray) -> float:
    """Share of (interior) pixels nearer the band colour than the shape's palette colour."""
    own = np.linalg.norm(pixels - np.array(COLOURS[colour]), axis=-1)
    band = np.linalg.norm(pixels - np.array(_band_colour(border)), axis=-1)
    return float(np.mean(band < own))


def _hue(pixels: np.ndarray) -> np.ndarray:
    """Hue in degrees of (n, 3) RGB pixels (0 where there is no chroma)."""
    red, green, blue = pixels[:, 0], pixels[:, 1], pixels[:, 2]
    top, chroma = pixels.max(axis=-1), np.ptp(pixels, axis=-1)
    safe = np.where(chroma > 0, chroma, 1)
    sector = np.where(
        top == red,
        ((green - blue) / safe) % 6,
        np.where(top == green, (blue - red) / safe + 2, (red - green) / safe + 4),
    )
    return np.where(chroma > 0, sector * 60, 0.0)


def _hue_distance(a: float, b: float) -> float:
    return abs((a - b + 180) % 360 - 180)
