"""Which weights setup loads, and fetching the folders that are missing.

The container loads `FLUX_MODEL_DIR` (default `weights/`). When folders are missing there, setup
fetches them, as hosted containers do to keep the image small, unless the gated FLUX.1-dev is
among them and no `HF_TOKEN` is set: then setup fails with one message that names both ways out.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flux_lora.errors import ModelNotFoundError
from flux_lora.models.files import missing_models
from flux_lora.models.layout import GATED, RANDOM_WEIGHTS_MARKER, ModelSource, configured_model_dir

log = logging.getLogger(__name__)


def locate_models() -> ModelSource:
    root = configured_model_dir()
    if (root / RANDOM_WEIGHTS_MARKER).is_file():
        log.warning("%s holds configs only (%s): random weights, for benchmarks", root, RANDOM_WEIGHTS_MARKER)
        return ModelSource(root, random_weights=True)
    missing = missing_models(root)
    if missing:
        _fetch(root, missing)
    return ModelSource(root)


def _fetch(root: Path, missing: list[str]) -> None:
    if GATED in missing and not os.environ.get("HF_TOKEN"):
        raise ModelNotFoundError(
            f"{root} does not hold {', '.join(missing)}. Either set HF_TOKEN to a token of a Hugging "
            f"Face account that accepted the {GATED} licence, and setup fetches them there; or put them "
            "there yourself (scripts/download-weights, or mount a folder and point FLUX_MODEL_DIR at "
            "it). Without weights, ./scripts/predict and ./scripts/serve run the demo model."
        )
    from flux_lora.models.download import download_models

    log.info("Fetching %s into %s ...", ", ".join(missing), root)
    started = time.perf_counter()
    download_models(root, folders=missing, progress=False)
    log.info("Fetched the missing weights in %.1f s", time.perf_counter() - started)
