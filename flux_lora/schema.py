"""The request, the size tables, and the cross-field rules cog's per-field checks cannot express."""

from __future__ import annotations

from dataclasses import dataclass

from flux_lora.errors import InputError
from flux_lora.urls import is_fetchable_url, redact

# Width x height at 1 megapixel. This table drives both the `aspect_ratio` choices and the sizes.
ASPECT_RATIOS: dict[str, tuple[int, int]] = {
    "1:1": (1024, 1024),
    "16:9": (1344, 768),
    "21:9": (1536, 640),
    "3:2": (1216, 832),
    "2:3": (832, 1216),
    "4:5": (896, 1088),
    "5:4": (1088, 896),
    "3:4": (896, 1152),
    "4:3": (1152, 896),
    "9:16": (768, 1344),
    "9:21": (640, 1536),
}
CUSTOM = "custom"
ASPECT_RATIO_CHOICES = [*ASPECT_RATIOS, CUSTOM]
# `megapixels` choice -> what each side of the 1-megapixel size is divided by.
MEGAPIXELS: dict[str, int] = {"1": 1, "0.25": 2}
MODELS = ["dev", "schnell"]
OUTPUT_FORMATS = ["webp", "jpg", "png"]

SIZE_STEP = 16  # FLUX latents are 1/8 of the image, packed 2x2
MAX_IMAGE_SIDE = 1440  # img2img/inpaint inputs are scaled down to fit this
# torch.Generator.manual_seed accepts this range (negative seeds wrap around 2**64).
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
WHOLE_NUMBER_FIELDS = ("height", "width", "num_outputs", "num_inference_steps", "seed", "output_quality")


@dataclass(frozen=True)
class GenerationRequest:
    """One prediction's inputs, after cog has checked each field's type and bounds."""

    prompt: str
    image: str | None = None  # an http(s) or data: URL (flux_lora.images fetches it)
    mask: str | None = None
    aspect_ratio: str = "1:1"
    height: int | None = None
    width: int | None = None
    prompt_strength: float = 0.8
    model: str = "dev"
    num_outputs: int = 1
    num_inference_steps: int = 28
    guidance_scale: float = 3.0
    seed: int | None = None
    output_format: str = "webp"
    output_quality: int = 80
    disable_safety_checker: bool = False
    go_fast: bool = False
    megapixels: str = "1"
    replicate_weights: str | None = None
    lora_scale: float = 1.0
    extra_lora: str | None = None
    extra_lora_scale: float = 1.0

    def __post_init__(self) -> None:
        # Over HTTP a whole-number input may arrive as a float: 1.0 from a client that writes
        # numbers so, and any integer beyond 64 bits, which coglet's JSON reader turns into one.
        for name in WHOLE_NUMBER_FIELDS:
            value = getattr(self, name)
            if isinstance(value, float):
                object.__setattr__(self, name, _whole_number(name, value))

    @property
    def mode(self) -> str:
        if self.mask is not None:
            return "inpaint"
        return "img2img" if self.image is not None else "txt2img"


def check_request(request: GenerationRequest) -> None:
    """Raise one InputError for the first cross-field rule the request breaks."""
    for name in ("image", "mask"):
        value = getattr(request, name)
        if value is not None and not is_fetchable_url(value):
            raise InputError(
                f"{name}: {_shorten(redact(value))!r} is not a URL. Send the image as an http(s) URL or "
                "a data: URI; local paths on the server are never read."
            )
    if request.mask is not None and request.image is None:
        raise InputError(
            "mask: a mask was given without an image. Inpainting repaints part of an input "
            "image: send `image` too, or drop `mask` for text-to-image."
        )
    if request.mode == "txt2img" and request.aspect_ratio == CUSTOM:
        missing = [name for name in ("width", "height") if getattr(request, name) is None]
        if missing:
            raise InputError(
                f"aspect_ratio: 'custom' needs both width and height, but {' and '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing. Send width and height "
                "(256 to 1440), or pick a preset aspect ratio."
            )
    if request.mode != "txt2img":
        steps_run = int(request.num_inference_steps * request.prompt_strength)
        if steps_run < 1:
            raise InputError(
                f"prompt_strength: {request.prompt_strength} with num_inference_steps="
                f"{request.num_inference_steps} leaves no denoising step to run. Use "
                f"prompt_strength >= {1 / request.num_inference_steps:.3f} or more steps."
            )
    if request.seed is not None and not SEED_MIN <= request.seed <= SEED_MAX:
        raise InputError(
            f"seed: {request.seed} is out of range. Use an integer from 0 to {SEED_MAX}, "
            "or leave it out for a random seed."
        )


def unused_inputs(request: GenerationRequest, size: tuple[int, int]) -> list[str]:
    """A note for each size input the request set that this request does not use (`size` is what
    it draws): the schema lets them through, and a user who set one expects it to count."""
    defaults = GenerationRequest(prompt="")
    given = [name for name in ("width", "height") if getattr(request, name) is not None]
    drawn = f"{size[0]}x{size[1]}"
    if request.mode != "txt2img":
        given += [
            name
            for name in ("aspect_ratio", "megapixels")
            if getattr(request, name) != getattr(defaults, name)
        ]
        if not given:
            return []
        return [
            f"{_named(request, given)}: not used with an image: the output takes the input image's size ({drawn})"
        ]
    if request.aspect_ratio != CUSTOM and given:
        return [
            f"{_named(request, given)}: not used: width and height apply only with aspect_ratio=custom; "
            f"this picture is {drawn} (aspect_ratio={request.aspect_ratio}, megapixels={request.megapixels})"
        ]
    if request.aspect_ratio == CUSTOM and request.megapixels != defaults.megapixels:
        return [
            f"megapixels={request.megapixels}: not used with aspect_ratio=custom: width and height set the size ({drawn})"
        ]
    return []


def _named(request: GenerationRequest, names: list[str]) -> str:
    """The inputs `names` as the request set them, e.g. "width=640, height=480"."""
    return ", ".join(f"{name}={getattr(request, name)}" for name in names)


def _whole_number(name: str, value: float) -> int:
    if not value.is_integer():
        raise InputError(f"{name}: {value!r} is not a whole number. Send an integer, like {int(value)}.")
    if abs(value) > 2**53:  # past this a float no longer holds every integer
        raise InputError(
            f"{name}: {value!r} reached the server as a rounded floating-point number, so its exact "
            f"value is lost. Send an integer from {SEED_MIN} to {SEED_MAX} that the JSON reader keeps "
            "exact (up to 64 bits), or leave it out."
        )
    return int(value)


def round_to_step(side: int) -> int:
    """Nearest multiple of 16, halves rounded up (1000 -> 1008), never below 16."""
    return max(SIZE_STEP, (side + SIZE_STEP // 2) // SIZE_STEP * SIZE_STEP)


def resolve_size(request: GenerationRequest) -> tuple[int, int]:
    """Width and height of a text-to-image request."""
    if request.aspect_ratio == CUSTOM:
        assert request.width is not None and request.height is not None  # check_request
        return round_to_step(request.width), round_to_step(request.height)
    width, height = ASPECT_RATIOS[request.aspect_ratio]
    divisor = MEGAPIXELS[request.megapixels]
    return width // divisor, height // divisor


def fit_input_size(width: int, height: int) -> tuple[int, int]:
    """Size for an img2img/inpaint input: scaled down to fit MAX_IMAGE_SIDE, aspect kept,
    sides rounded to multiples of 16 without crossing the bound."""
    scale = min(1.0, MAX_IMAGE_SIDE / max(width, height))
    return tuple(  # type: ignore[return-value]
        min(MAX_IMAGE_SIDE, round_to_step(round(side * scale))) for side in (width, height)
    )


def _shorten(value: object, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
