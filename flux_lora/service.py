"""One prediction, start to finish: the single call `predict.py` makes into the package."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from flux_lora.errors import UnsupportedFeatureError
from flux_lora.images import load_image, load_mask
from flux_lora.models import locate_models
from flux_lora.output import save_images
from flux_lora.pipeline import FluxPipelines
from flux_lora.schema import GenerationRequest, check_request, resolve_size

log = logging.getLogger(__name__)


class FluxLoraService:
    def __init__(self, pipelines: FluxPipelines, output_root: Path):
        self.pipelines = pipelines
        self.output_root = output_root
        # coglet calls run() from whichever of its tokio threads is free, and torch's OpenMP
        # keeps one thread team per calling thread: switching callers left the previous team
        # spinning on our cores (tiny model, 2 cores: 49 ms a call instead of 33). All torch
        # work therefore runs on this one thread.
        self._torch_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flux-lora-torch")

    @classmethod
    def setup(cls, weights: str | None = None) -> FluxLoraService:
        """Load both FLUX releases; `weights` is the model's own LoRA (`COG_WEIGHTS`)."""
        if weights:
            raise UnsupportedFeatureError(
                "COG_WEIGHTS is set, but this build cannot apply LoRA weights yet, and serving "
                "the base model in their place would be wrong. Unset COG_WEIGHTS to serve "
                "plain FLUX."
            )
        pipelines = FluxPipelines.load(locate_models())
        return cls(pipelines, Path(tempfile.mkdtemp(prefix="flux-lora-out-")))

    def predict(self, request: GenerationRequest) -> list[Path]:
        return self._torch_thread.submit(self._predict, request).result()

    def _predict(self, request: GenerationRequest) -> list[Path]:
        # 1. Rules across fields (cog has checked each field alone).
        check_request(request)
        _refuse_unsupported(request)

        # 2. Inputs and size: image modes take the input's size, txt2img the table's.
        image = mask = None
        if request.image is not None:
            image = load_image(request.image)
            size = image.size
            if request.mask is not None:
                mask = load_mask(request.mask, size)
        else:
            size = resolve_size(request)

        # 3. Seed.
        seed = request.seed if request.seed is not None else secrets.randbelow(2**32)
        log.info("Using seed: %d", seed)

        # 4. What this build does not do yet, said rather than hidden.
        if request.go_fast:
            log.info("go_fast: the fp8 path is not available yet; ran in %s", _dtype_name(self.pipelines))
        if not request.disable_safety_checker:
            log.info("Safety checker: not available yet; images are returned unfiltered")

        # 5. Generate and save. Files of the previous prediction have been delivered by now.
        log.info("%s %s %dx%d, %d step(s)", request.model, request.mode, *size, request.num_inference_steps)
        images = self.pipelines.generate(request, size=size, seed=seed, image=image, mask=mask)
        return save_images(images, self._fresh_output_dir(), request.output_format, request.output_quality)

    def _fresh_output_dir(self) -> Path:
        folder = self.output_root / "current"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder


def _refuse_unsupported(request: GenerationRequest) -> None:
    for name in ("replicate_weights", "extra_lora"):
        if getattr(request, name):
            raise UnsupportedFeatureError(
                f"{name}: this build cannot load LoRA weights yet. Leave {name} empty to run the base model."
            )


def _dtype_name(pipelines: FluxPipelines) -> str:
    return str(pipelines.dtype).removeprefix("torch.")
