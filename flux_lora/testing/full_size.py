"""A FLUX.1 model folder of configs only, at full size, for the GPU benchmark.

The folder has the layout of the real repositories and a `RANDOM_WEIGHTS` marker, so our own
loader (`flux_lora.pipeline`) builds every module from its config directly on the GPU with random
weights: the arithmetic, hence the time, of the trained model, in seconds and without 33 GB of
files. Tokenizers, scheduler and the safety models come from the tiny model (a tokenizer's
vocabulary does not change the arithmetic: T5 is padded to its fixed length anyway).

Sizes are those of the FLUX.1 [dev] and [schnell] repositories: transformer 19 double + 38
single blocks, 24 heads of 128 (width 3072); T5-XXL encoder (24 layers, width 4096); CLIP-L
text encoder (12 layers, width 768); the 16-channel VAE (128-256-512-512, two layers a block).
With `full=False` the same folder keeps the tiny sizes: what `--tiny` runs in CI.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from flux_lora.models import layout
from flux_lora.testing import tiny

FULL_SIZE = {
    "transformer": dict(
        num_layers=19,
        num_single_layers=38,
        attention_head_dim=128,
        num_attention_heads=24,
        joint_attention_dim=4096,
        pooled_projection_dim=768,
        axes_dims_rope=[16, 56, 56],
    ),
    "text_encoder_2": dict(
        d_model=4096,
        d_ff=10240,
        d_kv=64,
        num_heads=64,
        num_layers=24,
        vocab_size=32128,
        relative_attention_num_buckets=32,
    ),
    "text_encoder": dict(
        hidden_size=768,
        intermediate_size=3072,
        num_attention_heads=12,
        num_hidden_layers=12,
        projection_dim=768,
        vocab_size=49408,
    ),
    "vae": dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2, norm_num_groups=32),
}
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def write_model_folder(root: Path, *, full: bool = True) -> Path:
    """`root/FLUX.1-dev`, `root/FLUX.1-schnell`, the safety models and the marker; returns `root`."""
    source = tiny.build(layout.TINY_MODEL_DIR)
    if root.exists():
        shutil.rmtree(root)
    for release in layout.RELEASES.values():
        shutil.copytree(
            source / release,
            root / release,
            ignore=lambda _, names: [
                n for n in names if n.endswith(WEIGHT_SUFFIXES) or n.endswith(".index.json")
            ],
        )
        if full:
            for component, sizes in FULL_SIZE.items():
                config_file = root / release / component / "config.json"
                config = json.loads(config_file.read_text())
                config.update(sizes)
                config_file.write_text(json.dumps(config, indent=2) + "\n")
    for checker in layout.CHECKERS:
        shutil.copytree(source / checker, root / checker)
    (root / layout.RANDOM_WEIGHTS_MARKER).write_text(
        f"configs only ({'full' if full else 'tiny'} size): modules are built with random weights\n"
    )
    return root
