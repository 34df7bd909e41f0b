"""The trained demo model's architecture and folder layout: FLUX.1 [dev] and [schnell] at toy size.

The classes are FLUX.1's (FluxTransformer2DModel, a 16-channel AutoencoderKL, CLIPTextModel and
T5EncoderModel with their tokenizers, FlowMatchEulerDiscreteScheduler with the real schedulers'
settings) and the folders those of the Hugging Face repos, so the unchanged diffusers pipelines
load it through `FluxPipelines.load`. Two sizes differ from the real model on purpose:
- the VAE has 5 levels, not 4: 256 px images, the schema's smallest, give 16x16 latents, 8x8 =
  64 tokens after 2x2 packing (diffusers derives its scale factor, 16, from the number of
  levels), so image sides are multiples of 32. Training runs at 64 px with a 3-level VAE of the
  same latent space (CORE_VAE), which the 5-level one is distilled from (`demo_model.widen`);
- T5's relative attention sees only the next and previous token (every farther bucket is pinned
  at zero): the words still learn their order, and the padding after the prompt encodes to a run
  of identical vectors, which lets training stand in one weighted token for the run.

The two releases share every weight but the guidance embedder, which only [dev] has: training
steps alternate between the [dev] transformer and a guidance-free twin built on the same modules.
Weights are stored in float16 (half the bytes; the loader casts them to its own dtype).
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from demo_model import world
from flux_lora.models.layout import RELEASES
from flux_lora.testing import builder, tiny
from flux_lora.testing.builder import staging_beside, write_release
from flux_lora.testing.checkers import build_checkers

IMAGE_SIZE = 256  # what the saved model draws: 64 tokens
CORE_SIZE = 64  # what stages 1 to 4 train at, with CORE_VAE: the same 64 tokens
PIXELS_PER_TOKEN = 32  # the 5-level VAE's factor of 16, then 2x2 packing
CLIP_WIDTH = 64
T5_WIDTH = 64
# 2 double + 2 single blocks, width 128 = 4 heads x 32, rope axes summing to the head dim.
TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=T5_WIDTH,
    pooled_projection_dim=CLIP_WIDTH,
    axes_dims_rope=(8, 12, 12),
)
CORE_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=CORE_SIZE,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# Two thin outer levels around the core's three (whose weights they start from). Two groups a
# GroupNorm at every level (diffusers has one setting for all): the outer levels normalise 4 and
# 8 channels together, as FLUX's own VAE does at its outer two, and the inner ones 16 and 32,
# where the core had 4 and 8 (so the inherited weights are a head start only). With the core's 8
# groups each thin channel was normalised alone over the whole picture: an inpainted box's
# statistics then reached every pixel (widen.py has the figures).
VAE = dict(
    CORE_VAE,
    down_block_types=("DownEncoderBlock2D",) * 5,
    up_block_types=("UpDecoderBlock2D",) * 5,
    block_out_channels=(8, 16, 32, 64, 64),
    norm_num_groups=2,
    sample_size=IMAGE_SIZE,
)
CLIP = dict(
    hidden_size=CLIP_WIDTH,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=77,
    projection_dim=CLIP_WIDTH,
)
T5 = dict(
    d_model=T5_WIDTH,
    d_kv=16,
    d_ff=128,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    dropout_rate=0.0,  # training runs in train mode: no dropout, so it matches inference
)
# The tiny model's words, the world's, and a few a user may add for the LoRA's style.
WORDS = tuple(
    sorted(
        {
            *tiny.WORDS,
            *world.SHAPES,
            *world.COLOURS,
            *world.BACKGROUNDS,
            *("striped", "stripes", "plain", "shape"),
        }
    )
)
LORA_FILE = "stripes-lora.safetensors"
RECORD_FILE = "training.json"


def build_tokenizers(folder: Path):
    """The CLIP and T5 tokenizers (the builder's hand-written vocabularies over WORDS), written to
    `folder/tokenizer` and `folder/tokenizer_2` and read back with the classes the pipeline uses."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    builder.clip_tokenizer(folder / "tokenizer", WORDS)
    builder.t5_tokenizer(folder / "tokenizer_2", WORDS)
    return CLIPTokenizer.from_pretrained(folder / "tokenizer"), T5TokenizerFast.from_pretrained(
        folder / "tokenizer_2"
    )


def new_text_encoders(clip_tokenizer, t5_tokenizer, seed: int):
    from transformers import CLIPTextModel, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(builder.clip_config(clip_tokenizer, **CLIP))
    t5 = T5EncoderModel(builder.t5_config(t5_tokenizer, **T5))
    pin_far_buckets(t5)
    return clip, t5


def near_buckets() -> list[int]:
    """T5's relative-position buckets of the previous token, the token itself and the next one."""
    from transformers.models.t5.modeling_t5 import T5Attention

    offsets = torch.tensor([-1, 0, 1])
    buckets = T5Attention._relative_position_bucket(offsets, num_buckets=T5["relative_attention_num_buckets"])
    return sorted(set(buckets.tolist()))


def pin_far_buckets(t5) -> None:
    """Zero T5's position bias beyond the neighbouring tokens (see the module docstring)."""
    table = t5.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    far = [bucket for bucket in range(table.shape[0]) if bucket not in near_buckets()]
    with torch.no_grad():
        table[far] = 0.0


def new_core_vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**CORE_VAE)


def new_transformer(seed: int):
    """The [dev] transformer (with the guidance embedder)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=True)


def schnell_twin(dev):
    """A guidance-free FluxTransformer2DModel built on `dev`'s own modules: training either one
    trains both, and saving it writes [schnell]'s transformer."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        twin = FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=False)
    for name, _ in list(twin.named_children()):
        if name != "time_text_embed":
            setattr(twin, name, getattr(dev, name))
    for name in ("time_proj", "timestep_embedder", "text_embedder"):
        setattr(twin.time_text_embed, name, getattr(dev.time_text_embed, name))
    return twin


def save(root: Path, components: dict[str, object], schnell, lora: bytes | None, record: dict) -> Path:
    """Write `root/FLUX.1-dev`, `root/FLUX.1-schnell`, the safety models, the LoRA and the training
    record. `components` holds [dev]'s pipeline components; built in a temporary sibling folder
    and renamed into place, so a crash never leaves half a model where the loader looks."""
    import diffusers
    import transformers

    # Progress bars and diffusers' notice about casting (nothing is kept in float32 here) would
    # only clutter the training log.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    root = Path(root)
    try:
        with staging_beside(root) as staging:
            shared = staging / "shared"
            build_tokenizers(shared)  # written from WORDS, as the tokenizers being saved were
            for name in ("text_encoder", "text_encoder_2", "vae"):
                _save_component(components[name], shared / name)
            for variant, transformer in (("dev", components["transformer"]), ("schnell", schnell)):
                write_release(
                    staging / RELEASES[variant], variant, shared, partial(_save_component, transformer)
                )
            shutil.rmtree(shared)
            build_checkers(staging)
            if lora is not None:
                (staging / LORA_FILE).write_bytes(lora)
            (staging / RECORD_FILE).write_text(json.dumps(record, indent=2) + "\n")
            if root.exists():
                shutil.rmtree(root)
            staging.rename(root)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    return root


def replace_vae(root: Path, vae) -> None:
    """Write `vae` over both releases' VAE."""
    for variant in RELEASES:
        replace_component(root, variant, "vae", vae)


def replace_component(root: Path, variant: str, name: str, component) -> None:
    """Write `component` over one release's component `name`, through a sibling folder renamed
    into place."""
    target = Path(root) / RELEASES[variant] / name
    with staging_beside(target) as staging:
        _save_component(component, staging / name)
        shutil.rmtree(target)
        (staging / name).rename(target)


def to_tensor(images) -> torch.Tensor:
    """PIL images -> (batch, 3, height, width) in [-1, 1], the VAE's range."""
    pixels = np.stack([np.asarray(image) for image in images])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p, "RGB") for p in pixels]


def reconstruction_reading(decoded: torch.Tensor, originals: torch.Tensor, scenes) -> dict[str, float]:
    """The world checker's reading of a VAE's output for `scenes` (plain or striped): the share
    all right, the share whose stripes are as the scene says, and the mean error in 0..255."""
    verdicts = [world.judge(image, scene) for image, scene in zip(to_pil(decoded), scenes, strict=True)]
    return {
        "all_ok": round(float(np.mean([v.all_ok for v in verdicts])), 4),
        "stripes_kept": round(
            float(np.mean([v.striped == s.striped for v, s in zip(verdicts, scenes, strict=True)])), 4
        ),
        "mean_abs_error": round(float((decoded - originals).abs().mean() * 127.5), 2),
    }


def folder_size(root: Path) -> int:
    return sum(path.stat().st_size for path in Path(root).rglob("*") if path.is_file())


def parameter_count(modules: Iterable[torch.nn.Module]) -> int:
    return sum(parameter.numel() for module in modules for parameter in module.parameters())


def _save_component(component: object, folder: Path) -> None:
    if isinstance(component, torch.nn.Module):
        # A float16 copy: the model being trained keeps its float32 weights.
        copy.deepcopy(component).to(torch.float16).save_pretrained(folder)
    else:
        component.save_pretrained(folder)
    # A model loaded from a folder saves that folder's path as `_name_or_path`: a model folder
    # that is committed must not carry the paths of the machine that trained it.
    config = folder / "config.json"
    if config.is_file():
        settings = json.loads(config.read_text())
        if settings.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
