"""Tiny, randomly initialised safety models, in the layout of the real repos, built offline.

`safety-checker/` is a `StableDiffusionSafetyChecker` with its CLIP image processor, shaped like
CompVis/stable-diffusion-safety-checker; `nsfw-image-detection/` is a ViT image classifier with
the labels of Falconsai/nsfw_image_detection. With random weights the checker never flags an
image (its concept embeddings are all ones): tests plant a concept to make it flag one.
"""

from __future__ import annotations

from pathlib import Path

SAFETY_CHECKER_DIR = "safety-checker"
NSFW_CLASSIFIER_DIR = "nsfw-image-detection"
IMAGE_SIZE = 32
NSFW_LABELS = {0: "normal", 1: "nsfw"}


def build_checkers(root: Path) -> None:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        ViTConfig,
        ViTForImageClassification,
        ViTImageProcessor,
    )

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(6)
    config = CLIPConfig(
        text_config=dict(
            small, vocab_size=64, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1
        ),
        vision_config=dict(small, image_size=IMAGE_SIZE, patch_size=8),
        projection_dim=16,
    )
    StableDiffusionSafetyChecker(config).save_pretrained(root / SAFETY_CHECKER_DIR)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=IMAGE_SIZE).save_pretrained(
        root / SAFETY_CHECKER_DIR
    )

    torch.manual_seed(7)
    vit = ViTConfig(
        **small,
        image_size=IMAGE_SIZE,
        patch_size=8,
        num_labels=2,
        id2label=NSFW_LABELS,
        label2id={label: index for index, label in NSFW_LABELS.items()},
    )
    ViTForImageClassification(vit).save_pretrained(root / NSFW_CLASSIFIER_DIR)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(
        root / NSFW_CLASSIFIER_DIR
    )
