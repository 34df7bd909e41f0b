"""Build a tiny, randomly initialised FLUX.1 [dev] and [schnell] offline, with the safety models.

The folders have the layout of the real Hugging Face repos (diffusers format), the same classes
and the same token counts per image (VAE scale factor 8, 2x2 packing), so everything that loads
real FLUX loads these too. The images are noise: the weights are random.

Every file is a pure function of this code: seeded weights and tokenizer vocabularies written
out directly rather than trained (the `tokenizers` BPE trainer breaks ties at random, and so
does SentencePiece's). Rebuilding gives byte-identical files.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from flux_lora.tiny_checkers import NSFW_CLASSIFIER_DIR, SAFETY_CHECKER_DIR, build_checkers

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
SCHEDULERS = {
    "dev": dict(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    ),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False),
}
RELEASES = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}
CHECKERS = (SAFETY_CHECKER_DIR, NSFW_CLASSIFIER_DIR)
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
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        shared = _build_shared_components(staging / "shared")
        for variant, name in RELEASES.items():
            _build_release(staging / name, variant, shared)
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
    finally:
        shutil.rmtree(staging, ignore_errors=True)
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
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tokenizer = _clip_tokenizer(folder / "tokenizer")
    t5_tokenizer = _t5_tokenizer(folder / "tokenizer_2")

    torch.manual_seed(1)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(clip_tokenizer),
            hidden_size=CLIP_WIDTH,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=CLIP_WIDTH,
            bos_token_id=clip_tokenizer.bos_token_id,
            # Pooling reads the hidden state at this id: it must be the real end-of-text id.
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    clip.save_pretrained(folder / "text_encoder")

    torch.manual_seed(2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=len(t5_tokenizer),
            d_model=T5_WIDTH,
            d_kv=8,
            d_ff=64,
            num_layers=1,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            pad_token_id=t5_tokenizer.pad_token_id,
            eos_token_id=t5_tokenizer.eos_token_id,
        )
    )
    t5.save_pretrained(folder / "text_encoder_2")

    torch.manual_seed(3)
    AutoencoderKL(**VAE).save_pretrained(folder / "vae")
    return folder


def _build_release(folder: Path, variant: str, shared: Path) -> None:
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    for component in ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae"):
        shutil.copytree(shared / component, folder / component)
    torch.manual_seed(4 if variant == "dev" else 5)
    FluxTransformer2DModel(**TRANSFORMER, guidance_embeds=variant == "dev").save_pretrained(
        folder / "transformer"
    )
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULERS[variant]).save_pretrained(
        folder / "scheduler"
    )
    model_index = {
        "_class_name": "FluxPipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")


def _clip_tokenizer(folder: Path, words: Iterable[str] = WORDS):
    """A byte-level BPE vocabulary written by hand: every byte symbol, with and without the
    end-of-word marker, plus merges that make each word of `words` a single token."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for token in itertools.chain(symbols, (s + "</w>" for s in symbols)):
        vocab.setdefault(token, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in sorted(set(words)):
        pieces = [*word[:-1], word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _t5_tokenizer(folder: Path, words: Iterable[str] = WORDS):
    """A unigram vocabulary written by hand: T5's special tokens, then each word of `words` and
    each character as SentencePiece pieces, scored so whole words win."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -1.0) for word in sorted(set(words))]
    pieces += [(char, -5.0) for char in "abcdefghijklmnopqrstuvwxyz0123456789"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(folder)
    return tokenizer


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's scheme): printable
    Latin-1 bytes map to themselves, the rest to code points from 256 up, in byte order."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols
