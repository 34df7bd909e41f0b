"""What every small FLUX model here shares: configs, tokenizers and the folder each release is.

The tiny random model (`tiny`), the trained demo model (`demo_model.architecture`) and the
full-size configs of the GPU benchmark (`full_size`) are all FLUX.1 [dev] and [schnell] in the
layout of the Hugging Face repos. This module writes that layout once: the release folder with its
`model_index.json` and scheduler, the text-encoder configs tied to their tokenizers, and the
hand-written tokenizer vocabularies. Models are built in a temporary sibling folder and renamed
into place, so a crash never leaves half a model where a loader would find it.
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

# The real releases' scheduler settings: [dev] shifts with the image size, [schnell] does not.
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
MODEL_INDEX = {
    "_class_name": "FluxPipeline",
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "FluxTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# Identical in both releases, as in the real repos: written once, copied into each.
SHARED_COMPONENTS = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")


@contextmanager
def staging_beside(root: Path) -> Iterator[Path]:
    """A fresh temporary sibling of `root`, removed on the way out whatever happened; the caller
    renames it (or what it built in it) into place."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_release(folder: Path, variant: str, shared: Path, save_transformer: Callable[[Path], None]) -> None:
    """`folder` as the Hugging Face repo of `variant` lays it out: the shared components copied
    from `shared`, the transformer written by `save_transformer(path)`, the scheduler, the index."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    for component in SHARED_COMPONENTS:
        shutil.copytree(shared / component, folder / component)
    save_transformer(folder / "transformer")
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **SCHEDULERS[variant]).save_pretrained(
        folder / "scheduler"
    )
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2) + "\n")


def clip_config(tokenizer, **sizes):
    """A CLIPTextConfig of `sizes` whose special-token ids are `tokenizer`'s."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        # Pooling reads the hidden state at this id: it must be the real end-of-text id.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **sizes,
    )


def t5_config(tokenizer, **sizes):
    """A T5Config of `sizes` (an encoder only) whose special-token ids are `tokenizer`'s."""
    from transformers import T5Config

    return T5Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **sizes,
    )


def clip_tokenizer(folder: Path, words: Iterable[str]):
    """A byte-level BPE vocabulary written by hand: every byte symbol, with and without the
    end-of-word marker, plus merges that make each word of `words` a single token.

    Written out rather than trained: the `tokenizers` BPE trainer breaks ties at random, and so
    does SentencePiece's, while these files must be a pure function of the code."""
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


def t5_tokenizer(folder: Path, words: Iterable[str]):
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
