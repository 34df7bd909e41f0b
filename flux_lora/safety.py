"""The safety checkers: which generated images may be returned.

Every image goes through the Stable Diffusion safety checker (CLIP embeddings against NSFW
concept embeddings), batched on the model's device. Only the images it flags get a second
opinion from a ViT NSFW classifier, which can clear them; if that opinion cannot be had, the
image counts as unsafe.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from flux_lora.errors import ModelNotFoundError
from flux_lora.models.layout import NSFW_CLASSIFIER_DIR, SAFETY_CHECKER_DIR

log = logging.getLogger(__name__)

SAFE_LABEL = "normal"


@dataclass
class SafetyChecker:
    checker: torch.nn.Module
    checker_processor: object
    classifier: torch.nn.Module
    classifier_processor: object
    device: torch.device
    dtype: torch.dtype

    @classmethod
    def load(cls, root: Path, device: torch.device, dtype: torch.dtype) -> SafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from diffusers.utils import logging as diffusers_logging
        from transformers import AutoImageProcessor, AutoModelForImageClassification, CLIPImageProcessor

        missing = [
            name
            for name in (SAFETY_CHECKER_DIR, NSFW_CLASSIFIER_DIR)
            if not (root / name / "config.json").is_file()
        ]
        if missing:
            raise ModelNotFoundError(
                f"The safety checkers are missing from {root}: {', '.join(missing)}. Fetch them with "
                "scripts/download-weights (CompVis/stable-diffusion-safety-checker and "
                "Falconsai/nsfw_image_detection), or set FLUX_MODEL_DIR to a folder that holds them."
            )
        # diffusers' checker warns that it returns black images; we drop flagged images instead.
        diffusers_logging.get_logger("diffusers.pipelines.stable_diffusion.safety_checker").setLevel(
            logging.ERROR
        )
        started = time.perf_counter()
        checker = StableDiffusionSafetyChecker.from_pretrained(root / SAFETY_CHECKER_DIR, dtype=dtype).to(
            device
        )
        classifier = AutoModelForImageClassification.from_pretrained(
            root / NSFW_CLASSIFIER_DIR, dtype=dtype
        ).to(device)
        log.info("  safety checkers: loaded in %.2f s", time.perf_counter() - started)
        return cls(
            checker=checker.eval(),
            checker_processor=CLIPImageProcessor.from_pretrained(root / SAFETY_CHECKER_DIR),
            classifier=classifier.eval(),
            classifier_processor=AutoImageProcessor.from_pretrained(root / NSFW_CLASSIFIER_DIR),
            device=device,
            dtype=dtype,
        )

    def unsafe_indices(self, images: list[Image.Image]) -> list[int]:
        """Indices of the images that must not be returned."""
        flagged = self.flagged_by_checker(images)
        return [index for index in flagged if not self.cleared_by_second_opinion(images[index])]

    def flagged_by_checker(self, images: list[Image.Image]) -> list[int]:
        pixels = self.checker_processor(images=images, return_tensors="pt").pixel_values
        with torch.inference_mode():
            # The checker blacks out flagged entries of `images`: hand it placeholders, keep flags.
            _, flags = self.checker(
                clip_input=pixels.to(self.device, self.dtype), images=np.zeros((len(images), 1, 1, 3))
            )
        return [index for index, flagged in enumerate(flags) if flagged]

    def cleared_by_second_opinion(self, image: Image.Image) -> bool:
        try:
            inputs = self.classifier_processor(images=image, return_tensors="pt")
            with torch.inference_mode():
                logits = self.classifier(pixel_values=inputs.pixel_values.to(self.device, self.dtype)).logits
            label = self.classifier.config.id2label[int(logits[0].argmax())]
        except Exception as err:  # any failure to judge means no clearance
            log.warning(
                "Safety second opinion failed (%s); the image counts as unsafe", err.__class__.__name__
            )
            return False
        return label == SAFE_LABEL
