"""Loading FLUX.1 [dev] and [schnell] once, and running txt2img, img2img and inpaint on them."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from flux_lora.device.choice import default_device, dtype_name, serving_dtype
from flux_lora.device.compilation import Compiler
from flux_lora.device.placement import Residency
from flux_lora.device.quant import fp8_copy, fp8_copy_bytes, quantizes_activations
from flux_lora.device.tensors import module_bytes
from flux_lora.errors import FluxLoraError
from flux_lora.interrupt import Interrupt
from flux_lora.lora.slots import LoraSlots
from flux_lora.models.components import SHAREABLE, load_components
from flux_lora.models.layout import RELEASES, ModelSource
from flux_lora.schema import ASPECT_RATIOS, MEGAPIXELS, GenerationRequest, resolve_size

log = logging.getLogger(__name__)

# T5 prompt length each release was trained with.
MAX_SEQUENCE_LENGTH = {"dev": 512, "schnell": 256}
# Warnings that diffusers and transformers give for a prompt over an encoder's limit, replaced by
# one short line per encoder (`_log_truncation`): diffusers quotes the whole cut-off text (the T5
# one cut at CLIP's 77th token), transformers speaks of "indexing errors" that cannot happen.
TRUNCATION_WARNINGS = ("The following part of your input was truncated", "Token indices sequence length")


@dataclass(frozen=True)
class Variant:
    """One release's three pipelines; img2img and inpaint over the same modules as txt2img."""

    name: str
    txt2img: object
    img2img: object
    inpaint: object

    @property
    def uses_guidance(self) -> bool:
        return bool(self.txt2img.transformer.config.guidance_embeds)


class FluxPipelines:
    def __init__(
        self,
        variants: dict[str, Variant],
        device: torch.device,
        dtype: torch.dtype,
        residency: Residency | None = None,
    ):
        self.variants = variants
        self.device = device
        self.dtype = dtype
        # Which transformers are on the GPU; keys (release, fp8). Unbounded on the CPU.
        self.residency = residency or Residency(device, budget=2**62)
        self.fast_variants: dict[str, Variant] = {}  # go_fast: the same pipelines on an fp8 copy
        self.fast_modes: dict[str, str] = {}
        self.compiler: Compiler | None = None  # set by compile_for_serving
        self.lora_slots: dict[tuple[str, bool], LoraSlots] = {}  # (release, fp8) of compiled transformers

    def variant(self, name: str, *, fast: bool = False) -> Variant:
        """The release's pipelines; with `fast`, on an fp8 copy of its transformer, made on first
        use (the text encoders and VAE stay shared)."""
        if not fast:
            return self.variants[name]
        if name not in self.fast_variants:
            started = time.perf_counter()
            base = self.variants[name]
            self.residency.ensure((name, False))
            self.residency.make_room(fp8_copy_bytes(base.txt2img.transformer), keep={(name, False)})
            fp8 = fp8_copy(base.txt2img.transformer, self.device, MAX_SEQUENCE_LENGTH[name])
            self.residency.add((name, True), fp8.module, evictable=False)
            self.fast_variants[name] = _assemble(name, {**base.txt2img.components, "transformer": fp8.module})
            self.fast_modes[name] = fp8.mode
            log.info(
                "go_fast: %s transformer copied to %s in %.2f s",
                RELEASES[name],
                fp8.mode,
                time.perf_counter() - started,
            )
        return self.fast_variants[name]

    def compile_for_serving(self, compiler: Compiler, max_rank: int, *, warm_up: str = "all") -> None:
        """Both releases, bf16 and fp8: LoRA slots, compiled in place, and warmed up on every
        shape served, so that no request pays for a compilation."""
        started = time.perf_counter()
        self.compiler = compiler
        compiler.load_cache()
        keys = [(name, fast) for name in RELEASES for fast in (False, True)]
        for name in RELEASES:  # the fp8 copies first: copies of the slot-free transformers
            self.variant(name, fast=True)
        for name, fast in keys:
            self.residency.ensure((name, fast))
            transformer = self.variant(name, fast=fast).txt2img.transformer
            self.lora_slots[(name, fast)] = LoraSlots.install(transformer, max_rank)
            self.residency.add((name, fast), transformer, evictable=not fast)  # measured again, with slots
            fp8_matmuls = fast and quantizes_activations(self.fast_modes[name])
            compiler.compile(transformer, unbacked_batch=not fp8_matmuls)
        shapes = warm_up_shapes() if warm_up == "all" else warm_up_shapes()[-2:]
        # The default request's transformer (dev, bf16) last: on a GPU too small for all four it is
        # then the one on the GPU at READY.
        for name, fast in sorted(keys, key=lambda key: key == ("dev", False)):
            warm_started, compiled_before = time.perf_counter(), compiler.compilations
            for width, height, outputs in shapes:
                self._warm_up(name, fast, width, height, outputs)
            log.info(
                "torch.compile: %s%s warmed up on %d shapes in %.1f s (%d compilations)",
                RELEASES[name],
                " fp8" if fast else "",
                len(shapes),
                time.perf_counter() - warm_started,
                compiler.compilations - compiled_before,
            )
        compiler.save_cache()
        log.info(
            "torch.compile (%s): %d transformers warmed up on %d shapes each, %d compilations, in %.1f s",
            compiler.settings.backend,
            len(keys),
            len(shapes),
            compiler.compilations,
            time.perf_counter() - started,
        )

    def _warm_up(self, name: str, fast: bool, width: int, height: int, outputs: int) -> None:
        """One denoising step through the serving call (same grad mode, dtypes and text length),
        stopping at the latents: the VAE is not compiled."""
        variant = self.variant(name, fast=fast)
        self.residency.ensure((name, fast))
        kwargs: dict[str, object] = dict(
            prompt="warm-up",
            width=width,
            height=height,
            num_inference_steps=1,
            num_images_per_prompt=outputs,
            generator=torch.Generator("cpu").manual_seed(0),
            max_sequence_length=MAX_SEQUENCE_LENGTH[variant.name],
            output_type="latent",
        )
        if variant.uses_guidance:
            kwargs["guidance_scale"] = 3.0
        with torch.inference_mode():
            variant.txt2img(**kwargs)

    @classmethod
    def load(cls, source: ModelSource, device: torch.device | None = None) -> FluxPipelines:
        device = device or default_device()
        dtype = serving_dtype(device)
        log.info("Loading FLUX from %s on %s (%s)", source.root, device, dtype_name(dtype))
        _quiet_library_output()
        loaded: dict[str, dict[str, object]] = {}
        for variant in RELEASES:
            loaded[variant] = load_components(source, variant, device, dtype, loaded.get("dev"))
        variants = {name: _assemble(name, components) for name, components in loaded.items()}
        shared = {
            id(c): c
            for v in loaded.values()
            for k, c in v.items()
            if k in SHAREABLE and isinstance(c, torch.nn.Module)
        }
        residency = Residency.for_device(device, fixed_bytes=sum(module_bytes(m) for m in shared.values()))
        for name, variant in variants.items():
            residency.add((name, False), variant.txt2img.transformer)
        return cls(variants, device, dtype, residency)

    def generate(
        self,
        request: GenerationRequest,
        *,
        size: tuple[int, int],
        seed: int,
        image: Image.Image | None = None,
        mask: Image.Image | None = None,
        fast: bool = False,
        interrupt: Interrupt | None = None,
    ) -> list[Image.Image]:
        variant = self.variant(request.model, fast=fast)
        self.residency.ensure((request.model, fast))
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
        if interrupt is not None:
            kwargs["callback_on_step_end"] = _stop_when(interrupt)
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
        compiled_before = self.compilations
        with torch.inference_mode():
            images = list(pipe(**kwargs).images)
        if self.compilations > compiled_before:
            log.warning(
                "torch.compile: %d compilation(s) during this request, which the warm-up should have made",
                self.compilations - compiled_before,
            )
        return images

    @property
    def min_side(self) -> int:
        """The smallest image side the models draw: one packed latent (2x2 latents of the VAE)."""
        return 2 * self.variant("dev").txt2img.vae_scale_factor

    @property
    def compilations(self) -> int:
        return self.compiler.compilations if self.compiler else 0


def warm_up_shapes() -> list[tuple[int, int, int]]:
    """(width, height, outputs) for every preset size at both megapixel settings with one output,
    then the last one with two. The first compiles every graph (one per block class, for every
    size and batch), but for the fp8 matmuls' larger batches, which the last compiles; the rest
    check that nothing more compiles, as the count shows. The quick warm-up runs the last two."""
    shapes = [
        (*resolve_size(GenerationRequest(prompt="", aspect_ratio=ratio, megapixels=megapixels)), 1)
        for megapixels in MEGAPIXELS
        for ratio in ASPECT_RATIOS
    ]
    shapes = list(dict.fromkeys(shapes))
    return [*shapes, (*shapes[-1][:2], 2)]


def release_memory(device: torch.device) -> None:
    """After a failed call: free what it held, so the next request finds the memory it would
    find in a fresh container."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _stop_when(interrupt: Interrupt):
    """A step callback that ends the denoising loop once the prediction is canceled or out of time."""

    def check(pipe, step: int, timestep, tensors: dict) -> dict:
        try:
            interrupt.check()
        except FluxLoraError:
            log.info("Denoising stopped after step %d", step + 1)
            raise
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


def _quiet_library_output() -> None:
    """Before loading: our log lines only. Progress bars would land in every setup log as
    carriage-return noise, and the truncation warnings are replaced by `_log_truncation`."""
    from flux_lora import third_party_logs

    third_party_logs.install()  # before diffusers' first import, which imports torchao
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    for name in ("pipeline_flux", "pipeline_flux_img2img", "pipeline_flux_inpaint"):
        logging.getLogger(f"diffusers.pipelines.flux.{name}").addFilter(_DROP_TRUNCATION_WARNINGS)
    logging.getLogger("transformers.tokenization_utils_base").addFilter(_DROP_TRUNCATION_WARNINGS)


def _assemble(name: str, components: dict[str, object]) -> Variant:
    """The release's three pipelines over the same modules. Built directly, not with
    `from_pipe`: diffusers 0.42's `from_pipe` ends with `.to(dtype=...)`, float32 unless told,
    which cast every shared module (transformer, T5, CLIP, VAE) of a bf16 load to fp32."""
    from diffusers import FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline

    variant = Variant(
        name=name,
        txt2img=FluxPipeline(**components),
        img2img=FluxImg2ImgPipeline(**components),
        inpaint=FluxInpaintPipeline(**components),
    )
    for pipe in (variant.txt2img, variant.img2img, variant.inpaint):
        pipe.set_progress_bar_config(disable=True)
    return variant
