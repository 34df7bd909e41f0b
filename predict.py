"""Cog adapter: declares the inputs of Replicate's FLUX LoRA models and calls the package once."""

import logging
import sys
from typing import Optional

from cog import BaseRunner, Input, Path, current_scope

from flux_lora.schema import ASPECT_RATIO_CHOICES, MEGAPIXELS, MODELS, OUTPUT_FORMATS, GenerationRequest
from flux_lora.service import FluxLoraService

LORA_SOURCES = (
    "Load LoRA weights. Supports Replicate models in the format <owner>/<username> or "
    "<owner>/<username>/<version>, HuggingFace URLs in the format huggingface.co/<owner>/<model-name>, "
    "CivitAI URLs in the format civitai.com/models/<id>[/<model-name>], or arbitrary .safetensors URLs "
    "from the Internet. For example, 'fofr/flux-pixar-cars'"
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


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
        self.service = FluxLoraService.setup(weights)

    def run(
        self,
        prompt: str = Input(
            description="Prompt for generated image. If you include the `trigger_word` used in the training "
            "process you are more likely to activate the trained object, style, or concept in the resulting image."
        ),
        image: Optional[Path] = Input(
            description="Input image for image to image or inpainting mode. If provided, aspect_ratio, width, "
            "and height inputs are ignored."
        ),
        mask: Optional[Path] = Input(
            description="Image mask for image inpainting mode. If provided, aspect_ratio, width, and height "
            "inputs are ignored."
        ),
        aspect_ratio: str = Input(
            default="1:1",
            choices=ASPECT_RATIO_CHOICES,
            description="Aspect ratio for the generated image. If custom is selected, uses height and width "
            "below & will run in bf16 mode",
        ),
        height: Optional[int] = Input(ge=256, le=1440, description=CUSTOM_SIDE.format(side="Height")),
        width: Optional[int] = Input(ge=256, le=1440, description=CUSTOM_SIDE.format(side="Width")),
        prompt_strength: float = Input(
            default=0.8,
            ge=0,
            le=1,
            description="Prompt strength when using img2img. 1.0 corresponds to full destruction of "
            "information in image",
        ),
        model: str = Input(
            default="dev",
            choices=MODELS,
            description="Which model to run inference with. The dev model performs best with around 28 "
            "inference steps but the schnell model only needs 4 steps.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of outputs to generate"),
        num_inference_steps: int = Input(
            default=28,
            ge=1,
            le=50,
            description="Number of denoising steps. More steps can give more detailed images, but take longer.",
        ),
        guidance_scale: float = Input(
            default=3,
            ge=0,
            le=10,
            description="Guidance scale for the diffusion process. Lower values can give more realistic "
            "images. Good values to try are 2, 2.5, 3 and 3.5",
        ),
        seed: Optional[int] = Input(description="Random seed. Set for reproducible generation"),
        output_format: str = Input(
            default="webp", choices=OUTPUT_FORMATS, description="Format of the output images"
        ),
        output_quality: int = Input(
            default=80,
            ge=0,
            le=100,
            description="Quality when saving the output images, from 0 to 100. 100 is best quality, 0 is "
            "lowest quality. Not relevant for .png outputs",
        ),
        disable_safety_checker: bool = Input(
            default=False, description="Disable safety checker for generated images."
        ),
        go_fast: bool = Input(
            default=False,
            description="Run faster predictions with model optimized for speed (currently fp8 quantized); "
            "disable to run in original bf16",
        ),
        megapixels: str = Input(
            default="1",
            choices=list(MEGAPIXELS),
            description="Approximate number of megapixels for generated image",
        ),
        replicate_weights: Optional[str] = Input(description=LORA_SOURCES),
        lora_scale: float = Input(default=1, ge=-1, le=3, description=LORA_SCALE.format(which="main")),
        extra_lora: Optional[str] = Input(description=LORA_SOURCES),
        extra_lora_scale: float = Input(default=1, ge=-1, le=3, description=LORA_SCALE.format(which="extra")),
    ) -> list[Path]:
        request = GenerationRequest(
            prompt=prompt,
            image=image,
            mask=mask,
            aspect_ratio=aspect_ratio,
            height=height,
            width=width,
            prompt_strength=prompt_strength,
            model=model,
            num_outputs=num_outputs,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            output_format=output_format,
            output_quality=output_quality,
            disable_safety_checker=disable_safety_checker,
            go_fast=go_fast,
            megapixels=megapixels,
            replicate_weights=replicate_weights,
            lora_scale=lora_scale,
            extra_lora=extra_lora,
            extra_lora_scale=extra_lora_scale,
        )
        prediction = self.service.predict(request)
        scope = current_scope()
        for name, value in prediction.metrics.items():
            scope.record_metric(name, value)
        return [Path(path) for path in prediction.paths]
