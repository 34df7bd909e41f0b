"""Which FLUX weights to load, from where: a real `FLUX_MODEL_DIR`, or the tiny embedded model."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from flux_lora import tiny
from flux_lora.errors import ModelNotFoundError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "weights"
TINY_MODEL_DIR = DEFAULT_MODEL_DIR / "tiny"
RELEASES = tiny.RELEASES  # variant -> folder name, as in the Hugging Face repos


@dataclass(frozen=True)
class ModelSource:
    root: Path

    def release_dir(self, variant: str) -> Path:
        return self.root / RELEASES[variant]


def locate_models() -> ModelSource:
    """`FLUX_MODEL_DIR` when set (it must hold both releases); else `weights/` when it holds
    them; else the tiny model, built into `weights/tiny/` on first use."""
    configured = os.environ.get("FLUX_MODEL_DIR")
    if configured:
        root = Path(configured).expanduser()
        missing = missing_releases(root)
        if missing:
            raise ModelNotFoundError(
                f"FLUX_MODEL_DIR={root} does not hold {' or '.join(missing)} "
                "(each a diffusers folder with model_index.json). Put the weights there, point "
                "FLUX_MODEL_DIR at the folder that holds them, or unset it to use the tiny model."
            )
        return ModelSource(root)
    if not uses_tiny_model():
        return ModelSource(DEFAULT_MODEL_DIR)
    log.info(
        "No FLUX weights in %s: serving the tiny random model (its images are noise).", DEFAULT_MODEL_DIR
    )
    return ModelSource(tiny.build(TINY_MODEL_DIR))


def missing_releases(root: Path) -> list[str]:
    return [name for name in RELEASES.values() if not (root / name / "model_index.json").is_file()]


def uses_tiny_model() -> bool:
    """True when neither FLUX_MODEL_DIR nor weights/ points at real weights."""
    return not os.environ.get("FLUX_MODEL_DIR") and bool(missing_releases(DEFAULT_MODEL_DIR))
