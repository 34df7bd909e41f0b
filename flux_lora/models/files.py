"""The model folders under FLUX_MODEL_DIR: which repo fills each, which of its files the loaders
read, and whether what is on disk is complete and loads. `models.download` fetches them.

A folder counts as complete when its `.flux-lora-complete` marker lists files that are all there at
their recorded sizes, or, without a marker (a folder put there by hand), when its layout is whole:
`model_index.json`, every component it names with weights, every shard an index names.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path

from flux_lora.errors import DownloadError, FluxLoraError, InputError, ModelNotFoundError
from flux_lora.models.layout import CHECKERS, COMPONENTS, FLUX_FOLDERS, MODEL_REPOS, SAFETY_CHECKER_DIR
from flux_lora.tensor_files import verify_safetensors

log = logging.getLogger("flux_lora.models.download")

COMPONENT_SUFFIXES = (".json", ".safetensors", ".txt", ".model")  # configs, tokenizers, weights
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
MARKER = ".flux-lora-complete"
HF_CACHE = ".cache"  # huggingface_hub's bookkeeping inside a local_dir


def folders_in_scope(folders: list[str] | None) -> list[str]:
    unknown = [f for f in folders or () if f not in MODEL_REPOS]
    if unknown:
        raise InputError(f"unknown model folder {unknown[0]!r}: choose from {', '.join(MODEL_REPOS)}")
    return list(MODEL_REPOS) if folders is None else list(dict.fromkeys(folders))


# --- what is on disk -------------------------------------------------------------------------


def missing_models(root: Path) -> list[str]:
    """The folders of MODEL_REPOS that are not complete under `root` (cheap: no file is read whole)."""
    return [folder for folder in MODEL_REPOS if not is_complete(Path(root) / folder, folder)]


def verify_models(
    root: Path, *, load: bool = False, folders: list[str] | None = None, device: object | None = None
) -> None:
    """Raise ModelNotFoundError, naming the file and the fix, unless every folder is complete: its
    layout, every config parses, every safetensors header is well formed, every shard an index names
    exists. With `load`, also load them with the server's own loaders (on `device`, default as the
    server picks)."""
    root = Path(root)
    wanted = folders_in_scope(folders)
    for folder in wanted:
        check_folder(root / folder, folder)
    if load:
        _load(root, wanted, device)


def is_complete(path: Path, folder: str) -> bool:
    if (path / MARKER).is_file():
        return _complete_marker(path) is not None
    return not _layout_problems(path, folder)  # a folder put there by hand


def recorded_ids(path: Path) -> dict[str, str]:
    """The content ids the marker of a complete folder records (download-weights writes them):
    relative path -> id. Empty for an incomplete folder, one put there by hand, or an older marker."""
    marker = _complete_marker(path)
    ids = marker.get("ids") if marker is not None else None
    if not isinstance(ids, dict):
        return {}
    return {name: content_id for name, content_id in ids.items() if isinstance(content_id, str)}


def _complete_marker(path: Path) -> dict | None:
    """The folder's marker when every file it lists is there at its recorded size, else None."""
    try:
        marker = json.loads((path / MARKER).read_text())
        if all(_has_size(path / name, size) for name, size in marker["files"].items()):
            return marker
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def _has_size(path: Path, size: int | None) -> bool:
    return path.is_file() and (size is None or path.stat().st_size == size)


def _layout_problems(path: Path, folder: str) -> list[str]:
    """What is missing from a folder for its loader, cheaply: names, not contents."""
    if not path.is_dir():
        return [f"{path} does not exist"]
    if folder not in FLUX_FOLDERS:
        needs = [path / "config.json", path / "preprocessor_config.json"]
        problems = [f"{p} is missing" for p in needs if not p.is_file()]
        return problems + _weights_problems(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as err:
        return [f"{path / 'model_index.json'} is missing or unreadable ({type(err).__name__})"]
    problems = []
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        part = path / name
        if "Tokenizer" in str(spec[1]):
            problems += [] if part.is_dir() and any(part.iterdir()) else [f"{part} is missing or empty"]
        elif "Scheduler" in str(spec[1]):
            needs = part / "scheduler_config.json"
            problems += [] if needs.is_file() else [f"{needs} is missing"]
        else:
            needs = part / "config.json"
            problems += ([] if needs.is_file() else [f"{needs} is missing"]) + _weights_problems(part)
    return problems


def _weights_problems(path: Path) -> list[str]:
    """Weights in `path`: safetensors (every shard its index names present) or a .bin."""
    if not path.is_dir():
        return [f"{path} is missing"]
    indexes = list(path.glob("*.safetensors.index.json"))
    for index in indexes:
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [f"{index} is unreadable"]
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            return [f"{path / missing[0]} is missing (named by {index.name})"]
    if indexes or list(path.glob("*.safetensors")) or list(path.glob("*.bin")):
        return []
    return [f"{path} holds no weights (*.safetensors or *.bin)"]


def check_folder(path: Path, folder: str) -> None:
    fix = f"run scripts/download-weights --only {folder}"
    if not path.is_dir():
        raise ModelNotFoundError(f"{path} is missing ({MODEL_REPOS[folder]}): {fix}")
    problems = _layout_problems(path, folder)
    if problems:
        raise ModelNotFoundError(f"{path} is incomplete: {problems[0]}; {fix}")
    damaged = f"delete {path} and {fix}"
    files = (p for p in path.rglob("*") if p.is_file() and HF_CACHE not in p.relative_to(path).parts)
    for file in sorted(files):
        if file.suffix == ".json":
            try:
                json.loads(file.read_text())
            except (UnicodeDecodeError, ValueError):
                raise ModelNotFoundError(f"{file} is damaged (not JSON): {damaged}") from None
        elif file.suffix == ".safetensors":
            try:
                verify_safetensors(file, str(file))
            except InputError as err:
                raise ModelNotFoundError(f"{err}: {damaged}") from None


def _load(root: Path, folders: list[str], device: object | None) -> None:
    """Load what `folders` name as the server does: both releases with FluxPipelines.load, both
    checkers with SafetyChecker.load; a folder without its pair with the loaders of its classes."""
    import torch

    from flux_lora.device.choice import default_device, serving_dtype
    from flux_lora.models.layout import ModelSource
    from flux_lora.pipeline import FluxPipelines
    from flux_lora.safety import SafetyChecker

    device = torch.device(device) if device is not None else default_device()
    dtype = serving_dtype(device)
    pairs = {
        FLUX_FOLDERS: lambda: FluxPipelines.load(ModelSource(root), device),
        CHECKERS: lambda: SafetyChecker.load(root, device, dtype),
    }
    for pair, load_pair in pairs.items():
        present = [f for f in pair if f in folders]
        if len(present) == len(pair):
            _loads(" and ".join(pair), root, load_pair)
        for folder in present if len(present) == 1 else ():
            _loads(folder, root, lambda folder=folder: _load_alone(root / folder, folder, dtype))


def _loads(what: str, root: Path, loader) -> None:
    started = time.perf_counter()
    try:
        loaded = loader()
    except (FluxLoraError, MemoryError):
        raise
    except Exception as err:  # whatever a loader raises, the message must say which folder
        raise ModelNotFoundError(f"{what} in {root} does not load: {type(err).__name__}: {err}") from err
    del loaded  # free the memory before the next one
    log.info("%s: loads (%.1f s)", what, time.perf_counter() - started)


def _load_alone(path: Path, folder: str, dtype) -> object:
    if folder in FLUX_FOLDERS:
        from diffusers import FluxPipeline

        return FluxPipeline.from_pretrained(path, dtype=dtype)
    if folder == SAFETY_CHECKER_DIR:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        model = StableDiffusionSafetyChecker.from_pretrained(path, dtype=dtype)
        return model, CLIPImageProcessor.from_pretrained(path)
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    model = AutoModelForImageClassification.from_pretrained(path, dtype=dtype)
    return model, AutoImageProcessor.from_pretrained(path)


# --- choosing files --------------------------------------------------------------------------


def select_files(folder: str, names: Iterable[str]) -> list[str]:
    """The files of the repo behind `folder` that its loader reads, from the repo's file names."""
    names = set(names)
    repo = MODEL_REPOS[folder]
    if folder in FLUX_FOLDERS:
        required = ["model_index.json"]
        chosen = {
            n for n in names if "/" in n and n.split("/")[0] in COMPONENTS and n.endswith(COMPONENT_SUFFIXES)
        }
    else:
        required = ["config.json", "preprocessor_config.json"]
        chosen = set()
        if "model.safetensors" in names:
            required.append("model.safetensors")
        elif "model.safetensors.index.json" in names:
            required.append("model.safetensors.index.json")
            chosen = {n for n in names if SHARD.fullmatch(n)}
        elif "pytorch_model.bin" in names:
            log.info("%s: %s has no model.safetensors; fetching pytorch_model.bin instead", folder, repo)
            required.append("pytorch_model.bin")
        else:
            required.append("model.safetensors (or pytorch_model.bin)")
    missing = [n for n in required if n not in names]
    if missing:
        raise DownloadError(
            f"{folder}: {repo} has no {', '.join(missing)}, so it is not the model {folder}/ is for; "
            "check HF_ENDPOINT"
        )
    return sorted(chosen | set(required))
