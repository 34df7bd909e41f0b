"""Where the model weights live and what each folder is called: the names every other module uses.

A model root (`FLUX_MODEL_DIR`, default `weights/`) holds one folder per Hugging Face repo, named
as the repo's own model is: the two FLUX.1 releases in diffusers format and the two safety models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL_DIR = REPO_ROOT / "weights"
TINY_MODEL_DIR = DEFAULT_MODEL_DIR / "tiny"  # the tiny random model, built on first use
DEMO_MODEL_DIR = REPO_ROOT / "demo"  # the trained demo model, committed

RELEASES = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}  # variant -> folder name
GATED = RELEASES["dev"]  # its licence must be accepted on Hugging Face before a token can fetch it
SAFETY_CHECKER_DIR = "safety-checker"
NSFW_CLASSIFIER_DIR = "nsfw-image-detection"
FLUX_FOLDERS = tuple(RELEASES.values())
CHECKERS = (SAFETY_CHECKER_DIR, NSFW_CLASSIFIER_DIR)
MODEL_REPOS = {  # folder under the model root -> Hugging Face repo
    RELEASES["dev"]: "black-forest-labs/FLUX.1-dev",
    RELEASES["schnell"]: "black-forest-labs/FLUX.1-schnell",
    SAFETY_CHECKER_DIR: "CompVis/stable-diffusion-safety-checker",
    NSFW_CLASSIFIER_DIR: "Falconsai/nsfw_image_detection",
}
COMPONENTS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
# A file in a model root of configs only: every module is built with random weights (the GPU
# benchmark's full-size FLUX, `flux_lora.testing.full_size`).
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


@dataclass(frozen=True)
class ModelSource:
    root: Path
    # Configs only, modules built on the device with random weights: the GPU benchmark's full-size
    # FLUX, whose arithmetic (hence time) is that of the trained weights, without 33 GB of files.
    random_weights: bool = False

    def release_dir(self, variant: str) -> Path:
        return self.root / RELEASES[variant]


def configured_model_dir() -> Path:
    return Path(os.environ.get("FLUX_MODEL_DIR") or DEFAULT_MODEL_DIR).expanduser()
