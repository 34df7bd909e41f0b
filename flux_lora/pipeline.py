"""Loading FLUX.1 [dev] and [schnell] once, and running txt2img, img2img and inpaint on them."""

from __future__ import annotations

import gc
import hashlib
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from flux_lora.errors import CanceledError
from flux_lora.models import RELEASES, ModelSource
from flux_lora.quant import fp8_copy
from flux_lora.schema import GenerationRequest

log = logging.getLogger(__name__)

# Components that the two releases may carry identically; loaded once when they do.
SHAREABLE = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")
# T5 prompt length each release was trained with.
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}
# Warnings that diffusers and transformers give for a prompt over an encoder's limit, replaced by
# one short line per encoder (`_log_truncation`): diffusers quotes the whole cut-off text (the T5
# one cut at CLIP's 77th token), transformers speaks of "indexing errors" that cannot happen.
TRUNCATION_WARNINGS = ("The following part of your input was truncated", "Token indices sequence length")


@dataclass(frozen=True)
class Variant:
    """One release's three pipelines; img2img and inpaint reuse txt2img's modules (`from_pipe`)."""

    name: str
    txt2img: object
    img2img: object
    inpaint: object

    @property
    def uses_guidance(self) -> bool:
        return bool(self.txt2img.transformer.config.guidance_embeds)


class FluxPipelines:
    def __init__(self, variants: dict[str, Variant], device: torch.device, dtype: torch.dtype):
        self.variants = variants
        self.device = device
        self.dtype = dtype
        self.fast_variants: dict[str, Variant] = {}  # go_fast: the same pipelines on an fp8 copy
        self.fast_modes: dict[str, str] = {}

    def variant(self, name: str, *, fast: bool = False) -> Variant:
        """The release's pipelines; with `fast`, on an fp8 copy of its transformer, made on first
        use (the text encoders and VAE stay shared)."""
        if not fast:
            return self.variants[name]
        if name not in self.fast_variants:
            started = time.perf_counter()
            base = self.variants[name]
            fp8 = fp8_copy(base.txt2img.transformer, self.device)
            self.fast_variants[name] = _assemble(name, {**base.txt2img.components, "transformer": fp8.module})
            self.fast_modes[name] = fp8.mode
            log.info(
                "go_fast: %s transformer copied to %s in %.2f s",
                RELEASES[name],
                fp8.mode,
                time.perf_counter() - started,
            )
        return self.fast_variants[name]

    @classmethod
    def load(cls, source: ModelSource, device: torch.device | None = None) -> FluxPipelines:
        device = device or default_device()
        # bf16 is what FLUX runs in on a GPU; the CPU has no fast bf16 matmul, so it gets fp32.
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        log.info("Loading FLUX from %s on %s (%s)", source.root, device, str(dtype).removeprefix("torch."))
        loaded: dict[str, dict[str, object]] = {}
        for variant in RELEASES:
            loaded[variant] = _load_components(
                source.release_dir(variant), device, dtype, loaded.get("dev"), source
            )
        variants = {name: _assemble(name, components) for name, components in loaded.items()}
        return cls(variants, device, dtype)

    def generate(
        self,
        request: GenerationRequest,
        *,
        size: tuple[int, int],
        seed: int,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        fast: bool = False,
        cancel: threading.Event | None = None,
    ) -> list[Image.Image]:
        variant = self.variant(request.model, fast=fast)
        width, height = size
        kwargs: dict[str, object] = dict(
            prompt=request.prompt,
            width=width,
            height=height,
            num_inference_steps=request.num_inference_steps,
            num_images_per_prompt=request.num_outputs,
            # A CPU generator gives the same noise for a seed on every device.
            generator=torch.Generator("cpu").manual_seed(seed),
            max_sequence_length=MAX_SEQUENCE_LENGTH[variant.name],
            output_type="pil",
        )
        if cancel is not None:
            kwargs["callback_on_step_end"] = _stop_when(cancel)
        if variant.uses_guidance:
            kwargs["guidance_scale"] = request.guidance_scale
        if mask is not None:
            pipe = variant.inpaint
            kwargs.update(image=image, mask_image=mask, strength=request.prompt_strength)
        elif image is not None:
            pipe = variant.img2img
            kwargs.update(image=image, strength=request.prompt_strength)
        else:
            pipe = variant.txt2img
        _log_truncation(variant.txt2img, request.prompt, MAX_SEQUENCE_LENGTH[variant.name])
        with torch.inference_mode():
            return list(pipe(**kwargs).images)


def release_memory(device: torch.device) -> None:
    """After a failed call: free what it held, so the next request finds the memory it would
    find in a fresh container."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stop_when(cancel: threading.Event):
    """A step callback that ends the denoising loop once `cancel` is set."""

    def check(pipe, step: int, timestep, tensors: dict) -> dict:
        if cancel.is_set():
            raise CanceledError(f"canceled after step {step + 1}")
        return tensors

    return check


def _log_truncation(pipe, prompt: str, t5_limit: int) -> None:
    """One line per text encoder that reads only the start of the prompt."""
    for encoder, tokenizer, limit in (
        ("CLIP", pipe.tokenizer, pipe.tokenizer_max_length),
        ("T5", pipe.tokenizer_2, t5_limit),
    ):
        count = len(tokenizer(prompt, verbose=False).input_ids)
        if count > limit:
            log.info("Prompt truncated: %s keeps %d of %d tokens", encoder, limit, count)


class _DropTruncationWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(TRUNCATION_WARNINGS)


_DROP_TRUNCATION_WARNINGS = _DropTruncationWarnings()  # one instance: addFilter is then idempotent


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_components(
    folder: Path,
    device: torch.device,
    dtype: torch.dtype,
    reusable: dict[str, object] | None,
    source: ModelSource,
) -> dict[str, object]:
    """Each component of one release, timed; shareable ones taken from `reusable` when the
    files on disk are identical (compared by content, not by name)."""
    import diffusers
    import transformers
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    # Progress bars would land in every setup log as carriage-return noise.
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("pipeline_flux", "pipeline_flux_img2img", "pipeline_flux_inpaint"):
        logging.getLogger(f"diffusers.pipelines.flux.{name}").addFilter(_DROP_TRUNCATION_WARNINGS)
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_DROP_TRUNCATION_WARNINGS)

    classes = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5TokenizerFast,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": FluxTransformer2DModel,
    }
    components: dict[str, object] = {}
    for name, component_class in classes.items():
        if reusable is not None and name in SHAREABLE:
            dev_folder = source.release_dir("dev") / name
            if folder_digest(dev_folder) == folder_digest(folder / name):
                components[name] = reusable[name]
                log.info("  %s/%s: identical to FLUX.1-dev's, shared", folder.name, name)
                continue
        started = time.perf_counter()
        is_module = issubclass(component_class, torch.nn.Module)
        kwargs = {"dtype": dtype} if is_module else {}
        component = component_class.from_pretrained(folder / name, **kwargs)
        components[name] = component.to(device) if is_module else component
        log.info("  %s/%s: loaded in %.2f s", folder.name, name, time.perf_counter() - started)
    return components


def _assemble(name: str, components: dict[str, object]) -> Variant:
    import diffusers
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    txt2img = FluxPipeline(**components)
    # from_pipe calls .to(dtype=...), on which diffusers 0.42 warns about fp32-kept modules
    # even when there are none (its list is `or []`, never None): silence only that call.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        variant = Variant(
            name=name,
            txt2img=txt2img,
            img2img=FluxImg2ImgPipeline.from_pipe(txt2img),
            inpaint=FluxInpaintPipeline.from_pipe(txt2img),
        )
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)
    for pipe in (variant.txt2img, variant.img2img, variant.inpaint):
        pipe.set_progress_bar_config(disable=True)
    return variant


def folder_digest(folder: Path) -> str:
    """SHA-256 over a folder's relative file names and contents."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()
