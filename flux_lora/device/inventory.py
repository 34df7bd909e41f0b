"""What the container holds: every module, where it is, in which dtypes, and how big; and what
breaks the rule that everything serves in one dtype.

`python -m flux_lora inspect` prints this report; a server started with `FLUX_LORA_INSPECT_FILE`
writes it after setup and after every prediction. The rule (`faults`): every floating-point
tensor of every module is in the serving dtype, except where transformers keeps a layer in
float32 on purpose (`_keep_in_fp32_modules`); every linear weight of a go_fast copy is stored in
fp8; and each module's tensors are all on one device. It exists because a library call cast a
whole bf16 load to fp32 once, and nothing on a CPU in fp32 could see it.

Quantized weights are opened (`flux_lora.device.tensors`): their values count under their storage dtype
(fp8), their scales in `bytes` only, so the counts of `dtypes` add up to the parameter count.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from flux_lora.device.choice import dtype_name
from flux_lora.device.tensors import stored_tensors
from flux_lora.models.layout import RELEASES

INSPECT_FILE_ENV = "FLUX_LORA_INSPECT_FILE"
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
FP8_SUFFIX = "-fp8"
ENCODERS = ("text_encoder", "text_encoder_2", "vae")


def held_modules(pipelines, safety=None) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) for every module the pipelines and the safety checker hold, each once:
    `FLUX.1-dev/text_encoder_2`, `FLUX.1-schnell/transformer`, `FLUX.1-dev/transformer-fp8`,
    `safety-checker`, `nsfw-image-detection`. A module both releases share is named after dev."""
    held: dict[int, tuple[str, torch.nn.Module]] = {}
    for release, variant in pipelines.variants.items():
        for component in (*ENCODERS, "transformer"):
            module = getattr(variant.txt2img, component)
            held.setdefault(id(module), (f"{RELEASES[release]}/{component}", module))
    for release, variant in pipelines.fast_variants.items():
        module = variant.txt2img.transformer
        held.setdefault(id(module), (f"{RELEASES[release]}/transformer{FP8_SUFFIX}", module))
    if safety is not None:
        from flux_lora.models.layout import NSFW_CLASSIFIER_DIR, SAFETY_CHECKER_DIR

        held.setdefault(id(safety.checker), (SAFETY_CHECKER_DIR, safety.checker))
        held.setdefault(id(safety.classifier), (NSFW_CLASSIFIER_DIR, safety.classifier))
    return list(held.values())


def describe(name: str, module: torch.nn.Module) -> dict[str, object]:
    dtypes: Counter[str] = Counter()
    devices: set[str] = set()
    size = 0
    pinned = True
    for stored in stored_tensors(module):
        tensor = stored.tensor
        size += tensor.numel() * tensor.element_size()
        devices.add(str(tensor.device))
        pinned &= tensor.device.type == "cpu" and tensor.is_pinned()
        if stored.is_value:
            dtypes[dtype_name(tensor.dtype)] += tensor.numel()
    device = ",".join(sorted(devices)) or "none"
    if pinned and devices == {"cpu"} and torch.cuda.is_available():
        device = "cpu (pinned, waiting for the GPU)"
    return {"name": name, "device": device, "dtypes": dict(dtypes.most_common()), "bytes": size}


def faults(name: str, module: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """Each way `module` breaks the one-dtype rule, one line per kind of fault, naming an example."""
    fp8_copy = name.endswith(FP8_SUFFIX)
    kept_fp32 = _kept_in_fp32(module, dtype)
    wrong: dict[str, list[str]] = {}
    by_device: dict[str, list[str]] = {}
    for stored in stored_tensors(module):
        tensor = stored.tensor
        by_device.setdefault(str(tensor.device), []).append(stored.name)
        if not tensor.is_floating_point() or not stored.is_value:
            continue
        if stored.quantized:
            if tensor.dtype not in FP8_DTYPES:
                wrong.setdefault(f"quantized to {dtype_name(tensor.dtype)}, not fp8", []).append(stored.name)
            continue
        expected = torch.float32 if set(stored.name.split(".")) & kept_fp32 else dtype
        if tensor.dtype != expected:
            wrong.setdefault(f"in {dtype_name(tensor.dtype)}, not {dtype_name(expected)}", []).append(
                stored.name
            )
    if fp8_copy:
        plain = [
            f"{path}.weight"
            for path, layer in module.named_modules()
            if isinstance(layer, torch.nn.Linear)
            and ".lora_" not in path
            and not is_traceable_wrapper_subclass(layer.weight)
        ]
        if plain:
            wrong["linear weights not in fp8"] = plain
    if len(by_device) > 1:  # a module runs on one device: the others are strays (a partial move)
        for device, names in sorted(by_device.items(), key=lambda item: len(item[1]))[:-1]:
            wrong[f"on {device}, apart from the rest"] = names
    return [
        f"{name}: {len(names)} tensor(s) {what} (e.g. {names[0]})" for what, names in sorted(wrong.items())
    ]


def report(service) -> dict[str, object]:
    """The whole inventory of a `FluxLoraService`, as `inspect --json` prints it."""
    pipelines = service.pipelines
    modules = held_modules(pipelines, service.safety)
    residency = pipelines.residency
    compiler = pipelines.compiler
    return {
        "device": str(pipelines.device),
        "dtype": dtype_name(pipelines.dtype),
        "fp8": {RELEASES[name]: mode for name, mode in pipelines.fast_modes.items()},
        "compile": {
            "enabled": compiler is not None,
            "backend": compiler.settings.backend if compiler else None,
            "compilations": pipelines.compilations,
        },
        "gpu_budget_gib": round(residency.budget / 1024**3, 2) if pipelines.device.type == "cuda" else None,
        "gpu_resident": [_key_name(key) for key in residency.resident],
        "modules": [describe(name, module) for name, module in modules],
        "faults": [line for name, module in modules for line in faults(name, module, pipelines.dtype)],
    }


def write_report(service, path: Path) -> None:
    """`report(service)` as JSON at `path`, replaced whole (a reader never sees half of one)."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(report(service), indent=2) + "\n")
    partial.replace(path)


def _kept_in_fp32(module: torch.nn.Module, dtype: torch.dtype) -> set[str]:
    """Layer names transformers loads in float32 on purpose at `dtype` (T5's `wo` in float16)."""
    names = set()
    if dtype == torch.float16:
        names |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    return names


def _key_name(key: tuple[str, bool]) -> str:
    release, fp8 = key
    return f"{RELEASES[release]}/transformer{FP8_SUFFIX if fp8 else ''}"


def render(data: dict[str, object]) -> str:
    """`report`'s content as a table for people."""
    compile_state = data["compile"]
    lines = [
        f"device {data['device']}, serving dtype {data['dtype']}, "
        + (
            f"compiled ({compile_state['backend']}, {compile_state['compilations']} compilations)"
            if compile_state["enabled"]
            else "not compiled"
        ),
    ]
    lines += [f"go_fast {release}: {mode}" for release, mode in data["fp8"].items()]
    if data["gpu_budget_gib"] is not None:
        lines.append(
            f"GPU budget for transformers: {data['gpu_budget_gib']} GiB; on the GPU: "
            + ", ".join(data["gpu_resident"])
        )
    width = max(len(module["name"]) for module in data["modules"])
    lines.append("")
    for module in data["modules"]:
        dtypes = ", ".join(f"{name} {count / 1e6:,.1f} M" for name, count in module["dtypes"].items())
        lines.append(
            f"{module['name']:<{width}}  {module['device']:<8}  {module['bytes'] / 1024**3:7.3f} GiB  {dtypes}"
        )
    lines.append("")
    lines += [f"FAULT {line}" for line in data["faults"]] or [
        f"every module serves in {data['dtype']} (go_fast copies: fp8 weights)"
    ]
    return "\n".join(lines)
