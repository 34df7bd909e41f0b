"""Which model folder the scripts serve: the real weights when present, else a small model.

Neither small model is a silent fallback for the container: only the scripts choose them, and say
which. The trained demo model (committed in `demo/`) draws what its prompts ask; the tiny random
model, built on first use, draws noise.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flux_lora.models.files import missing_models
from flux_lora.models.layout import DEMO_MODEL_DIR, TINY_MODEL_DIR, configured_model_dir
from flux_lora.models.world import ModelWorld
from flux_lora.testing import tiny


def model_dir_for_scripts(demo: Path = DEMO_MODEL_DIR) -> Path:
    """The configured folder when it holds the weights (or FLUX_MODEL_DIR is set: setup then
    fetches or explains); otherwise the demo model, or without it the tiny random model (built on
    first use), with a notice."""
    root = configured_model_dir()
    if os.environ.get("FLUX_MODEL_DIR") or not missing_models(root):
        return root
    if not missing_models(demo):
        print(f"No FLUX weights in {root}: {demo_notice(demo)}.", file=sys.stderr)
        return demo
    print(f"No FLUX weights in {root}: using the tiny random model (its images are noise).", file=sys.stderr)
    return tiny.build(TINY_MODEL_DIR)


def demo_notice(demo: Path) -> str:
    """What the demo model draws and at which sizes, from its world.json (what it was measured
    drawing), so the notice cannot drift from the weights."""
    known = ModelWorld.load(demo)
    if known is None:
        return f"using the trained demo model in {demo}"
    return (
        f"using the trained demo model in {demo}: it draws {known.description}, e.g. "
        f'"{known.example}", at {known.sizes_known}'
    )
