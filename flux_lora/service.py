"""One prediction, start to finish: the single call `predict.py` makes into the package."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from flux_lora.device.choice import dtype_name
from flux_lora.device.compilation import Compiler, CompileSettings
from flux_lora.device.inventory import INSPECT_FILE_ENV, write_report
from flux_lora.errors import GenerationMemoryError, InputError, UnsafeImageError
from flux_lora.images import ImageFetcher, load_image, load_mask
from flux_lora.interrupt import Interrupt, phase_limits_from_env
from flux_lora.lora.adapters import GO_FAST_SCALE, AdapterSet, TransformerAdapters, WantedAdapter
from flux_lora.lora.cache import LoraCache
from flux_lora.lora.fetch import LoraFetcher
from flux_lora.lora.refs import LoraRef, parse_lora_ref
from flux_lora.lora.slots import MAX_RANK_ENV, max_rank_from_env
from flux_lora.models.layout import DEFAULT_MODEL_DIR
from flux_lora.models.locate import locate_models
from flux_lora.models.world import ModelWorld
from flux_lora.output import new_output_root, save_images
from flux_lora.pipeline import FluxPipelines, release_memory
from flux_lora.safety import SafetyChecker
from flux_lora.schema import (
    CUSTOM,
    MAX_IMAGE_SIDE,
    GenerationRequest,
    check_request,
    resolve_size,
    unused_inputs,
)

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = DEFAULT_MODEL_DIR / "lora-cache"
POLL_S = 0.05  # how often the waiting thread looks for a cancel or a passed limit


@dataclass(frozen=True)
class Prediction:
    paths: list[Path]
    metrics: dict[str, float] = field(default_factory=dict)


class FluxLoraService:
    def __init__(
        self,
        pipelines: FluxPipelines,
        safety: SafetyChecker,
        output_root: Path,
        fetcher: LoraFetcher,
        trained_lora: LoraRef | None = None,
        inspect_file: Path | None = None,
        world: ModelWorld | None = None,
    ):
        self.pipelines = pipelines
        self.safety = safety
        self.output_root = output_root
        self.fetcher = fetcher
        # Image inputs download under the same address policy, timeouts and redirect rules as LoRAs.
        self.image_fetcher = ImageFetcher(fetcher.http)
        # The model's own LoRA (COG_WEIGHTS), used as the main adapter when a request names none.
        # Kept as a reference, fetched through the cache when needed, so eviction cannot strand it.
        self.trained_lora = trained_lora
        self._adapters: dict[tuple[str, bool], TransformerAdapters] = {}  # per transformer: (release, fp8)
        # Wall-clock limits of a prediction's phases (FLUX_LORA_*_LIMIT_S).
        self.phase_limits = phase_limits_from_env()
        # FLUX_LORA_INSPECT_FILE: the inventory (`inspect --json`), rewritten after every prediction.
        self.inspect_file = inspect_file
        # What the demo model knows (its world.json); None for FLUX itself.
        self.world = world
        # coglet calls run() from whichever of its tokio threads is free, and torch's OpenMP
        # keeps one thread team per calling thread: switching callers left the previous team
        # spinning on our cores (tiny model, 2 cores: 49 ms a call instead of 33). All torch
        # work therefore runs on this one thread.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-lora-torch")

    @classmethod
    def setup(cls, weights: str | None = None) -> FluxLoraService:
        """Load both FLUX releases, and `weights` (`COG_WEIGHTS`), the model's own LoRA, as the
        main adapter: a reference that fails to fetch or load fails setup."""
        started = time.perf_counter()
        trained = parse_lora_ref(weights, "COG_WEIGHTS", allow_local=True) if weights else None
        source = locate_models()
        pipelines = FluxPipelines.load(source)
        compile_settings = CompileSettings.from_env(pipelines.device, DEFAULT_MODEL_DIR / "compile-cache")
        if compile_settings.enabled:
            max_rank = max_rank_from_env(os.environ.get(MAX_RANK_ENV))
            pipelines.compile_for_serving(
                Compiler(compile_settings, pipelines.device), max_rank, warm_up=compile_settings.warm_up
            )
        safety = SafetyChecker.load(source.root, pipelines.device, pipelines.dtype)
        fetcher = LoraFetcher.from_env(LoraCache.from_env(DEFAULT_CACHE_DIR))
        inspect_file = os.environ.get(INSPECT_FILE_ENV, "").strip()
        service = cls(
            pipelines,
            safety,
            new_output_root(),
            fetcher,
            trained,
            Path(inspect_file) if inspect_file else None,
            ModelWorld.load(source.root),
        )
        if trained is not None:
            service._torch_thread.submit(service._apply_loras, GenerationRequest(prompt=""), False).result()
        service._write_inventory()
        log.info("Setup done in %.2f s", time.perf_counter() - started)
        return service

    def predict(self, request: GenerationRequest) -> Prediction:
        """Runs the prediction on the torch thread. coglet cancels by raising in *this* thread,
        which a blocking wait would not notice until the work ends: so we wait in short slices,
        polling the phase limits, and on cancellation tell the work to stop at its next step (or
        wake its blocked download), wait for it to stop (the next prediction must start clean),
        and let the cancellation through."""
        interrupt = Interrupt(self.phase_limits)
        future = self._torch_thread.submit(self._predict_and_report, request, interrupt)
        try:
            while not wait([future], timeout=POLL_S).done:
                interrupt.poll()
        except BaseException:
            interrupt.cancel()
            wait([future])
            log.info("Canceled")
            raise
        return future.result()

    def _predict_and_report(self, request: GenerationRequest, interrupt: Interrupt) -> Prediction:
        try:
            return self._predict(request, interrupt)
        finally:
            self._write_inventory()

    def _write_inventory(self) -> None:
        if self.inspect_file is not None:
            write_report(self, self.inspect_file)

    def _predict(self, request: GenerationRequest, interrupt: Interrupt) -> Prediction:
        # 1. Rules across fields (cog has checked each field alone).
        check_request(request)

        # 2. Inputs and size: image modes take the input's size, txt2img the table's.
        image = mask = None
        if request.image is not None:
            with interrupt.phase("fetch"):
                image = load_image(self.image_fetcher.fetch(request.image, "image", interrupt))
                size = image.size
                self._check_side(size)
                if request.mask is not None:
                    mask = load_mask(self.image_fetcher.fetch(request.mask, "mask", interrupt), size)
        else:
            size = resolve_size(request)
        for note in unused_inputs(request, size) + (
            self.world.notes(request.prompt, size) if self.world else []
        ):
            log.info("%s", note)

        # 3. Seed.
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        log.info("Using seed: %d", seed)

        # 4. go_fast: the fp8 transformer, except for custom sizes, which the schema runs in bf16.
        fast = request.go_fast and not (request.mode == "txt2img" and request.aspect_ratio == CUSTOM)
        if request.go_fast and not fast:
            log.info("go_fast: custom sizes run in %s, as the schema says", dtype_name(self.pipelines.dtype))

        # 5. LoRAs: fetched (from the cache when there), then made the transformer's adapters.
        metrics = self._apply_loras(request, fast, interrupt)
        if fast:
            compiled = ", compiled" if self.pipelines.compiler else ""
            log.info("go_fast: %s%s", self.pipelines.fast_modes[request.model], compiled)

        # 6. Generate and save. Files of the previous prediction have been delivered by now.
        log.info("%s %s %dx%d, %d step(s)", request.model, request.mode, *size, request.num_inference_steps)
        try:
            with interrupt.phase("generate"):
                images = self.pipelines.generate(
                    request, size=size, seed=seed, image=image, mask=mask, fast=fast, interrupt=interrupt
                )
        except BaseException as err:
            release_memory(self.pipelines.device)
            if isinstance(err, torch.OutOfMemoryError):
                raise GenerationMemoryError(
                    f"Out of memory generating {request.num_outputs} image(s) of {size[0]}x{size[1]} on "
                    f"{self.pipelines.device.type}. Ask for fewer outputs (num_outputs) or a smaller size "
                    "(megapixels=0.25, or a smaller custom width and height)."
                ) from err
            raise
        if not request.disable_safety_checker:
            images = self._safe_only(images)
        folder = self._fresh_output_dir()
        return Prediction(save_images(images, folder, request.output_format, request.output_quality), metrics)

    def _check_side(self, size: tuple[int, int]) -> None:
        smallest = self.pipelines.min_side
        if min(size) < smallest:
            raise InputError(
                f"image: scaled to fit {MAX_IMAGE_SIDE} px it is {size[0]}x{size[1]}, and this model draws "
                f"at least {smallest} px a side. Send a larger image, or one less narrow (sides within "
                f"1:{MAX_IMAGE_SIDE // smallest} of each other)."
            )

    def _safe_only(self, images: list) -> list:
        unsafe = self.safety.unsafe_indices(images)
        if not unsafe:
            return images
        if len(unsafe) == len(images):
            raise UnsafeImageError(
                "The safety checker flagged every generated image, so none is returned. Try another "
                "prompt or another seed."
            )
        log.info("Safety checker: output(s) %s flagged and left out", ", ".join(map(str, unsafe)))
        return [image for index, image in enumerate(images) if index not in unsafe]

    def _apply_loras(
        self, request: GenerationRequest, fast: bool, interrupt: Interrupt | None = None
    ) -> dict[str, float]:
        interrupt = interrupt or Interrupt(self.phase_limits)
        started = time.perf_counter()
        sources: list[tuple[str, LoraRef, float]] = []
        if request.replicate_weights:
            main = parse_lora_ref(request.replicate_weights, "replicate_weights")
            sources.append(("replicate_weights", main, request.lora_scale))
        elif self.trained_lora is not None:
            sources.append(("COG_WEIGHTS", self.trained_lora, request.lora_scale))
        if request.extra_lora:
            sources.append(
                ("extra_lora", parse_lora_ref(request.extra_lora, "extra_lora"), request.extra_lora_scale)
            )

        wanted, from_cache = [], True
        for label, ref, scale in sources:
            with interrupt.phase("fetch"):
                fetched = self.fetcher.fetch(ref, label, interrupt)
            from_cache &= fetched.from_cache
            if fetched.trigger_word and fetched.trigger_word.lower() not in request.prompt.lower():
                log.info(
                    "Hint: %s was trained with the trigger word %r, which the prompt does not contain",
                    label,
                    fetched.trigger_word,
                )
            wanted.append(WantedAdapter(ref.identity, str(fetched.path), scale, label, ref.display))
        # The documented 1.5x compensates fp8: it applies when the fp8 transformer runs.
        multiplier = GO_FAST_SCALE if fast and wanted else 1.0
        if multiplier != 1.0:
            log.info("go_fast: LoRA scales x%.1f", multiplier)
        key = (request.model, fast)
        self.pipelines.residency.ensure(key)  # adapters change only on the GPU, where they run
        if key not in self._adapters:  # compiled transformers have slots, written in place
            self._adapters[key] = self.pipelines.lora_slots.get(key) or AdapterSet(
                self.pipelines.variant(request.model, fast=fast).txt2img.transformer
            )
        with interrupt.phase("load"):
            self._adapters[key].activate(wanted, multiplier, interrupt.check)
        if not wanted:
            return {}
        return {"lora_load_time": time.perf_counter() - started, "lora_from_cache": float(from_cache)}

    def _fresh_output_dir(self) -> Path:
        folder = self.output_root / "current"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder
