"""One release's components (scheduler, tokenizers, text encoders, VAE, transformer) from its
folder, timed: in the serving dtype on the serving device, the ones FLUX.1-dev already holds
identically taken from it, and for the benchmark's random-weight folders built from their configs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from flux_lora.models.identical import same_files
from flux_lora.models.layout import ModelSource

log = logging.getLogger(__name__)

# Components that the two releases may carry identically; loaded once when they do.
SHAREABLE = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")


def load_components(
    source: ModelSource,
    release: str,
    device: torch.device,
    dtype: torch.dtype,
    reusable: dict[str, object] | None,
) -> dict[str, object]:
    """Each component of `release`, timed; shareable ones taken from `reusable` (FLUX.1-dev's)
    when the files on disk are identical (`same_files`). `FluxPipelines.load` quiets the
    libraries' output before this first imports them."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    classes = {
        "scheduler": FlowMatchEulerDiscreteScheduler,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5TokenizerFast,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "vae": AutoencoderKL,
        "transformer": FluxTransformer2DModel,
    }
    folder = source.release_dir(release)
    components: dict[str, object] = {}
    for name, component_class in classes.items():
        if reusable is not None and name in SHAREABLE:
            dev_folder = source.release_dir("dev") / name
            if same_files(dev_folder, folder / name):
                components[name] = reusable[name]
                log.info("  %s/%s: identical to FLUX.1-dev's, shared", folder.name, name)
                continue
        started = time.perf_counter()
        is_module = issubclass(component_class, torch.nn.Module)
        if is_module and source.random_weights:
            components[name] = random_module(component_class, folder / name, device, dtype)
            log.info(
                "  %s/%s: built with random weights in %.2f s",
                folder.name,
                name,
                time.perf_counter() - started,
            )
            continue
        kwargs = {"dtype": dtype} if is_module else {}
        component = component_class.from_pretrained(folder / name, **kwargs)
        components[name] = component.to(device) if is_module else component
        log.info("  %s/%s: loaded in %.2f s", folder.name, name, time.perf_counter() - started)
    return components


def random_module(component_class: type, folder: Path, device: torch.device, dtype: torch.dtype):
    """The module `folder/config.json` describes, built directly on `device` in `dtype` with the
    class's own random initialisation: seconds, where reading trained weights takes minutes."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            if hasattr(component_class, "from_config"):  # diffusers
                module = component_class.from_config(component_class.load_config(folder))
            else:  # transformers
                config = component_class.config_class.from_pretrained(folder)
                module = component_class._from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    return module.eval()
