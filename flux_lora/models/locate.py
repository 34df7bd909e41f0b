"""Which weights to load, from where.

The container loads `FLUX_MODEL_DIR` (default `weights/`). When folders are missing there, setup
fetches them, as hosted containers do to keep the image small, unless the gated FLUX.1-dev is
among them and no `HF_TOKEN` is set: then setup fails with one message that names both ways out.
Neither small model is a silent fallback: when no weights are present the scripts choose the
trained demo model committed in `demo/` (issue 8), else the tiny random one, and say which
(`python -m flux_lora model-dir`).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flux_lora import tiny
from flux_lora.errors import ModelNotFoundError
from flux_lora.model_files import missing_models

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "weights"
TINY_MODEL_DIR = DEFAULT_MODEL_DIR / "tiny"
DEMO_MODEL_DIR = REPO_ROOT / "demo"
DEMO_NOTICE = (
    "using the trained demo model in {path}: it draws one shape on a plain background, e.g. "
    '"a red circle on a blue background", at 256x256 (aspect_ratio=custom width=256 height=256)'
)
RELEASES = tiny.RELEASES  # variant -> folder name, as in the Hugging Face repos
GATED = RELEASES["dev"]
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"  # a file in a model folder of configs only (bench/full_size.py)


@dataclass(frozen=True)
class ModelSource:
    root: Path
    # Configs only, modules built on the device with random weights: the GPU benchmark's full-size
    # FLUX, whose arithmetic (hence time) is that of the trained weights, without 33 GB of files.
    random_weights: bool = False

    def release_dir(self, variant: str) -> Path:
        return self.root / RELEASES[variant]


def locate_models() -> ModelSource:
    root = configured_model_dir()
    if (root / RANDOM_WEIGHTS_MARKER).is_file():
        log.warning("%s holds configs only (%s): random weights, for benchmarks", root, RANDOM_WEIGHTS_MARKER)
        return ModelSource(root, random_weights=True)
    missing = missing_models(root)
    if missing:
        _fetch(root, missing)
    return ModelSource(root)


def configured_model_dir() -> Path:
    return Path(os.environ.get("FLUX_MODEL_DIR") or DEFAULT_MODEL_DIR).expanduser()


def model_dir_for_scripts(demo: Path = DEMO_MODEL_DIR) -> Path:
    """The configured folder when it holds the weights (or FLUX_MODEL_DIR is set: setup then
    fetches or explains); otherwise the demo model, or without it the tiny random model (built on
    first use), with a notice."""
    root = configured_model_dir()
    if os.environ.get("FLUX_MODEL_DIR") or not missing_models(root):
        return root
    if not missing_models(demo):
        print(f"No FLUX weights in {root}: {DEMO_NOTICE.format(path=demo)}.", file=sys.stderr)
        return demo
    print(f"No FLUX weights in {root}: using the tiny random model (its images are noise).", file=sys.stderr)
    return tiny.build(TINY_MODEL_DIR)


def _fetch(root: Path, missing: list[str]) -> None:
    if GATED in missing and not os.environ.get("HF_TOKEN"):
        raise ModelNotFoundError(
            f"{root} does not hold {', '.join(missing)}. Either set HF_TOKEN to a token of a Hugging "
            f"Face account that accepted the {GATED} licence, and setup fetches them there; or put them "
            "there yourself (scripts/download-weights, or mount a folder and point FLUX_MODEL_DIR at "
            "it). Without weights, ./scripts/predict and ./scripts/serve run the demo model."
        )
    from flux_lora.model_download import download_models

    log.info("Fetching %s into %s ...", ", ".join(missing), root)
    started = time.perf_counter()
    download_models(root, folders=missing, progress=False)
    log.info("Fetched the missing weights in %.1f s", time.perf_counter() - started)
