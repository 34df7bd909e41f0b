"""Cog adapters: each predictor declares the inputs of one schema of Replicate's trained FLUX LoRA
models and calls the package once; they share all behaviour.

- `Predictor`: the canonical schema (model pages 000, 002, 004). `cog.yaml` runs it.
- `FirstReleasePredictor`: the first fine-tuner release (model page 001).
- `GoFastPredictor`: go_fast on by default, no replicate_weights (model page 003).

The model pages are the saved API pages of the Replicate models this container reproduces;
`tests/test_contract.py` compares each predictor's schema with its page.

Inputs a schema lacks take the canonical behaviour: `GenerationRequest`'s defaults (go_fast off,
1 megapixel, no replicate_weights, so `COG_WEIGHTS` is the main LoRA). Each predictor's schema is
committed (`python -m flux_lora openapi` writes them all); pick one with `run:` in cog.yaml, or
`--predictor predict.py:<Class>` for scripts/predict and scripts/serve.
"""

import logging
import sys
from typing import Any, ClassVar, Optional

from cog import BaseRunner, Input, Path, current_scope

from flux_lora.schema import ASPECT_RATIO_CHOICES, MEGAPIXELS, MODELS, OUTPUT_FORMATS, GenerationRequest
from flux_lora.service import FluxLoraService

LORA_REFERENCES = (
    "Supports Replicate models in the format <owner>/<username> or <owner>/<username>/<version>, "
    "HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, CivitAI URLs in the format "
    "civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs from the Internet. For example, "
    "'fofr/flux-pixar-cars'"
)
LORA_SCALE = (
    "Determines how strongly the {which} LoRA should be applied. Sane results between 0 and 1 for base "
    "inference. For go_fast we apply a 1.5x multiplier to this value; we've generally seen good performance "
    "when scaling the base value by that amount. You may still need to experiment to find the best value "
    "for your particular lora."
)
CUSTOM_SIDE = (
    "{side} of generated image. Only works if `aspect_ratio` is set to custom. Will be rounded to nearest "
    "multiple of 16. Incompatible with fast generation"
)
FIRST_RELEASE_SIDE = (
    "{side} of the generated image in text-to-image mode. Only used when aspect_ratio=custom. Must be a "
    "multiple of 16 (if it's not, it will be rounded to nearest multiple of 16). Note: Ignored in img2img "
    "and inpainting modes."
)


class Canonical:
    """The canonical inputs; the variants reuse those their pages show unchanged."""

    prompt = Input(
        description="Prompt for generated image. If you include the `trigger_word` used in the training "
        "process you are more likely to activate the trained object, style, or concept in the resulting image."
    )
    image = Input(
        description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, "
        "and height inputs are ignored."
    )
    mask = Input(
        description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height "
        "inputs are ignored."
    )
    aspect_ratio = Input(
        default="1:1",
        choices=ASPECT_RATIO_CHOICES,
        description="Aspect ratio for the generated image. If custom is selected, uses height and width "
        "below & will run in bf16 mode",
    )
    height = Input(ge=256, le=1440, description=CUSTOM_SIDE.format(side="Height"))
    width = Input(ge=256, le=1440, description=CUSTOM_SIDE.format(side="Width"))
    prompt_strength = Input(
        default=0.8,
        ge=0,
        le=1,
        description="Prompt strength when using img2img. 1.0 corresponds to full destruction of "
        "information in image",
    )
    model = Input(
        default="dev",
        choices=MODELS,
        description="Which model to run inference with. The dev model performs best with around 28 "
        "inference steps but the schnell model only needs 4 steps.",
    )
    num_outputs = Input(default=1, ge=1, le=4, description="Number of outputs to generate")
    num_inference_steps = Input(
        default=28,
        ge=1,
        le=50,
        description="Number of denoising steps. More steps can give more detailed images, but take longer.",
    )
    guidance_scale = Input(
        default=3,
        ge=0,
        le=10,
        description="Guidance scale for the diffusion process. Lower values can give more realistic "
        "images. Good values to try are 2, 2.5, 3 and 3.5",
    )
    seed = Input(description="Random seed. Set for reproducible generation")
    output_format = Input(default="webp", choices=OUTPUT_FORMATS, description="Format of the output images")
    output_quality = Input(
        default=80,
        ge=0,
        le=100,
        description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is "
        "lowest quality. Not relevant for .png outputs",
    )
    disable_safety_checker = Input(default=False, description="Disable safety checker for generated images.")
    go_fast = Input(
        default=False,
        description="Run faster predictions with model optimized for speed (currently fp8 quantized); "
        "disable to run in original bf16",
    )
    megapixels = Input(
        default="1",
        choices=list(MEGAPIXELS),
        description="Approximate number of megapixels for generated image",
    )
    replicate_weights = Input(description=f"Load LoRA weights. {LORA_REFERENCES}")
    lora_scale = Input(default=1, ge=-1, le=3, description=LORA_SCALE.format(which="main"))
    extra_lora = Input(description=f"Load LoRA weights. {LORA_REFERENCES}")
    extra_lora_scale = Input(default=1, ge=-1, le=3, description=LORA_SCALE.format(which="extra"))


class _FluxLoraRunner(BaseRunner):
    """What every predictor shares: setup, and one call into the package per prediction."""

    # Read by flux_lora.dev.openapi: True writes choices inline (`type` and `enum` on the input), as the
    # pages of older versions show them; False writes cog's `allOf` reference to a component.
    inline_enums: ClassVar[bool] = False
    # Read by flux_lora.dev.openapi: string inputs the schema shows as `format: uri`. They are `str`, not
    # `cog.Path`, so that cog does not download them itself (without our address policy and size
    # bound); flux_lora.images fetches them.
    url_inputs: ClassVar[tuple[str, ...]] = ("image", "mask")

    def setup(self, weights: Optional[str] = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.service = FluxLoraService.setup(weights)

    def _predict(self, run_locals: dict[str, Any]) -> list[Path]:
        """One prediction from `locals()` taken first thing in `run`: `self` and exactly its inputs."""
        inputs = {name: value for name, value in run_locals.items() if name != "self"}
        prediction = self.service.predict(GenerationRequest(**inputs))
        scope = current_scope()
        for name, value in prediction.metrics.items():
            scope.record_metric(name, value)
        return [Path(path) for path in prediction.paths]


class Predictor(_FluxLoraRunner):
    """The canonical schema: model pages 000, 002 and 004."""

    def run(
        self,
        prompt: str = Canonical.prompt,
        image: Optional[str] = Canonical.image,
        mask: Optional[str] = Canonical.mask,
        aspect_ratio: str = Canonical.aspect_ratio,
        height: Optional[int] = Canonical.height,
        width: Optional[int] = Canonical.width,
        prompt_strength: float = Canonical.prompt_strength,
        model: str = Canonical.model,
        num_outputs: int = Canonical.num_outputs,
        num_inference_steps: int = Canonical.num_inference_steps,
        guidance_scale: float = Canonical.guidance_scale,
        seed: Optional[int] = Canonical.seed,
        output_format: str = Canonical.output_format,
        output_quality: int = Canonical.output_quality,
        disable_safety_checker: bool = Canonical.disable_safety_checker,
        go_fast: bool = Canonical.go_fast,
        megapixels: str = Canonical.megapixels,
        replicate_weights: Optional[str] = Canonical.replicate_weights,
        lora_scale: float = Canonical.lora_scale,
        extra_lora: Optional[str] = Canonical.extra_lora,
        extra_lora_scale: float = Canonical.extra_lora_scale,
    ) -> list[Path]:
        return self._predict(locals())


class FirstReleasePredictor(_FluxLoraRunner):
    """Model page 001, the first fine-tuner release: no go_fast, megapixels or replicate_weights
    (its LoRA is the model's own, `COG_WEIGHTS`, plus `extra_lora`), its own order, defaults,
    bounds and descriptions, choices shown inline."""

    inline_enums = True

    def run(
        self,
        prompt: str = Canonical.prompt,
        image: Optional[str] = Input(
            description="Input image for img2img or inpainting mode. If provided, aspect_ratio, width, and "
            "height inputs are ignored."
        ),
        mask: Optional[str] = Input(
            description="Input mask for inpainting mode. Black areas will be preserved, white areas will be "
            "inpainted. Must be provided along with 'image' for inpainting mode."
        ),
        aspect_ratio: str = Input(
            default="1:1",
            choices=ASPECT_RATIO_CHOICES,
            description="Aspect ratio for the generated image in text-to-image mode. The size will always be "
            "1 megapixel, i.e. 1024x1024 if aspect ratio is 1:1. To use arbitrary width and height, set aspect "
            "ratio to 'custom'. Note: Ignored in img2img and inpainting modes.",
        ),
        width: Optional[int] = Input(ge=256, le=1440, description=FIRST_RELEASE_SIDE.format(side="Width")),
        height: Optional[int] = Input(ge=256, le=1440, description=FIRST_RELEASE_SIDE.format(side="Height")),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of images to output."),
        lora_scale: float = Input(
            default=1,
            ge=-1,
            le=2,
            description="Determines how strongly the main LoRA should be applied. Sane results between 0 and 1.",
        ),
        num_inference_steps: int = Input(
            default=28,
            ge=1,
            le=50,
            description="Number of inference steps. More steps can give more detailed images, but take longer.",
        ),
        model: str = Input(
            default="dev",
            choices=MODELS,
            description="Which model to run inferences with. The dev model needs around 28 steps but the "
            "schnell model only needs around 4 steps.",
        ),
        guidance_scale: float = Input(
            default=3.5, ge=0, le=10, description=Canonical.guidance_scale.description
        ),
        prompt_strength: float = Input(
            default=0.8,
            ge=0,
            le=1,
            description="Prompt strength when using img2img / inpaint. 1.0 corresponds to full destruction "
            "of information in image",
        ),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation."),
        extra_lora: Optional[str] = Input(
            description=f"Combine this fine-tune with another LoRA. {LORA_REFERENCES}"
        ),
        extra_lora_scale: float = Input(
            default=1, ge=-1, le=2, description="Determines how strongly the extra LoRA should be applied."
        ),
        output_format: str = Input(
            default="webp", choices=OUTPUT_FORMATS, description="Format of the output images."
        ),
        output_quality: int = Input(
            default=90, ge=0, le=100, description=Canonical.output_quality.description
        ),
        disable_safety_checker: bool = Canonical.disable_safety_checker,
    ) -> list[Path]:
        return self._predict(locals())


class GoFastPredictor(_FluxLoraRunner):
    """Model page 003: go_fast on by default, no replicate_weights, choices shown inline."""

    inline_enums = True

    def run(
        self,
        prompt: str = Canonical.prompt,
        image: Optional[str] = Canonical.image,
        mask: Optional[str] = Canonical.mask,
        aspect_ratio: str = Canonical.aspect_ratio,
        height: Optional[int] = Canonical.height,
        width: Optional[int] = Canonical.width,
        prompt_strength: float = Canonical.prompt_strength,
        model: str = Canonical.model,
        num_outputs: int = Canonical.num_outputs,
        num_inference_steps: int = Canonical.num_inference_steps,
        guidance_scale: float = Canonical.guidance_scale,
        seed: Optional[int] = Canonical.seed,
        output_format: str = Canonical.output_format,
        output_quality: int = Canonical.output_quality,
        disable_safety_checker: bool = Canonical.disable_safety_checker,
        go_fast: bool = Input(default=True, description=Canonical.go_fast.description),
        megapixels: str = Canonical.megapixels,
        lora_scale: float = Canonical.lora_scale,
        extra_lora: Optional[str] = Canonical.extra_lora,
        extra_lora_scale: float = Canonical.extra_lora_scale,
    ) -> list[Path]:
        return self._predict(locals())
