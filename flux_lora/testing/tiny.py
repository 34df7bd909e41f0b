"""Build a tiny, randomly initialised FLUX.1 [dev] and [schnell] offline, with the safety models.

The folders have the layout of the real Hugging Face repos (diffusers format), the same classes
and the same token counts per image (VAE scale factor 8, 2x2 packing), so everything that loads
real FLUX loads these too. The images are noise: the weights are random.

Every file is a pure function of this code: seeded weights and tokenizer vocabularies written
out directly rather than trained (the `tokenizers` BPE trainer breaks ties at random, and so
does SentencePiece's). Rebuilding gives byte-identical files.
"""

from __future__ import annotations

import shutil
from functools import partial
from pathlib import Path

from flux_lora.models.layout import CHECKERS, RELEASES
from flux_lora.testing import builder
from flux_lora.testing.builder import staging_beside, write_release
from flux_lora.testing.checkers import build_checkers

# Small enough to build in seconds and run 256x256 in a fraction of one; shapes obey FLUX's
# rules: in_channels = 16 latent channels x 2x2 packing, sum(axes_dims_rope) = head dim,
# joint_attention_dim = T5 width, pooled_projection_dim = CLIP width.
CLIP_WIDTH = 32
T5_WIDTH = 32
TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_WIDTH,
    axes_dims_rope=(4, 6, 6),
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=4,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    # FLUX.1's VAE statistics, so latents are scaled exactly as in the real pipeline.
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
CLIP = dict(
    hidden_size=CLIP_WIDTH,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=CLIP_WIDTH,
)
T5 = dict(
    d_model=T5_WIDTH,
    d_kv=8,
    d_ff=64,
    num_layers=1,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
)
WORDS = (
    *("a", "an", "the", "of", "on", "in", "with", "and", "tok", "emoji", "photo", "style"),
    *("cat", "dog", "circle", "square", "triangle", "star", "background", "portrait"),
    *("red", "green", "blue", "yellow", "white", "black", "small", "large"),
    *("painting", "drawing", "cartoon"),
)


def build(root: Path, *, force: bool = False) -> Path:
    """Write `root/FLUX.1-dev`, `root/FLUX.1-schnell` and the two safety models; returns `root`.

    Builds into a temporary sibling folder and renames it into place, so a crash never leaves
    a half-built model where the loader would find it.
    """
    root = Path(root)
    if not force and _is_complete(root):
        return root
    with staging_beside(root) as staging:
        shared = _build_shared_components(staging / "shared")
        for variant, name in RELEASES.items():
            write_release(staging / name, variant, shared, partial(_save_transformer, variant))
        build_checkers(staging)
        shutil.rmtree(staging / "shared")
        if root.exists() and (force or not _is_complete(root)):
            shutil.rmtree(root)  # forced, or left incomplete by an older version or a crash
        try:
            staging.rename(root)
        except OSError:
            # Another process finished the same build first; its files equal ours.
            if not _is_complete(root):
                raise
    return root


def random_lora(
    seed: int = 0,
    rank: int = 4,
    prefix: str = "transformer.",
    transformer: object | None = None,
    targets: tuple[str, ...] = ("attn", "proj"),
    dtype: object | None = None,
) -> bytes:
    """A random LoRA for the tiny transformer (or `transformer`, any FLUX size), as safetensors
    bytes, in the layout the Replicate trainer writes: diffusers/peft keys with the `transformer.`
    prefix on every linear layer whose path contains one of `targets` (by default every attention
    and projection layer), in `dtype` (default float32). Shapes come from the transformer built on the
    meta device (no memory)."""
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save

    model = transformer
    if model is None:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in model.named_modules():
        if ".lora_" in name:  # a transformer with LoRA slots: their layers are not targets
            continue
        name = name.removesuffix(".base_layer")  # peft keeps the wrapped layer under this name
        if isinstance(layer, torch.nn.Linear) and any(target in name for target in targets):
            tensors[f"{prefix}{name}.lora_A.weight"] = torch.randn(
                rank, layer.in_features, generator=generator
            ).to(dtype or torch.float32)
            tensors[f"{prefix}{name}.lora_B.weight"] = torch.randn(
                layer.out_features, rank, generator=generator
            ).to(dtype or torch.float32)
    return save(tensors)


def _is_complete(root: Path) -> bool:
    releases = all((root / name / "model_index.json").is_file() for name in RELEASES.values())
    return releases and all((root / name / "config.json").is_file() for name in CHECKERS)


def _build_shared_components(folder: Path) -> Path:
    """Text encoders, tokenizers and VAE: identical in both releases, as in the real repos."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, T5EncoderModel

    clip_tokenizer = builder.clip_tokenizer(folder / "tokenizer", WORDS)
    t5_tokenizer = builder.t5_tokenizer(folder / "tokenizer_2", WORDS)
    torch.manual_seed(1)
    CLIPTextModel(builder.clip_config(clip_tokenizer, **CLIP)).save_pretrained(folder / "text_encoder")
    torch.manual_seed(2)
    T5EncoderModel(builder.t5_config(t5_tokenizer, **T5)).save_pretrained(folder / "text_encoder_2")
    torch.manual_seed(3)
    AutoencoderKL(**VAE).save_pretrained(folder / "vae")
    return folder


def _save_transformer(variant: str, path: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(4 if variant == "dev" else 5)
    FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=variant == "dev").save_pretrained(path)
