"""`python -m flux_lora resolve-lora --file FILE`: what a local LoRA file is, read as a load
reads it against the transformer the scripts would serve, and which layers it touches."""

from __future__ import annotations

import json
import re
from pathlib import Path

from flux_lora.lora.adapters import read_lora
from flux_lora.lora.names import ModuleNames
from flux_lora.lora.updates import split_key


def describe_file(path: str) -> str:
    """What a local LoRA file is and which transformer layers it touches: `resolve-lora --file FILE`.
    Raises InputError as a load would, for a file this container refuses."""
    from flux_lora import third_party_logs

    third_party_logs.install()  # as setup does: diffusers' import would log them here
    served, names = served_transformer()
    converted = read_lora(path, "file", Path(path).name, names)
    lines = [f"{path}: {converted.describe()}", f"  checked against {served}"]
    if converted.skipped:
        lines.append(f"  not applied, this transformer lacks them: {', '.join(converted.skipped)}")
    layers = {}
    for module, update in converted.updates.items():
        form = (
            "dense"
            if update.dense is not None
            else f"rank {update.rank}"
            if update.has_weight
            else "bias only"
        )
        layers[module] = f"{' + '.join(sorted(update.kinds))}, {form}"
    lines.append(f"  {len(converted.updates)} transformer layers:")
    lines += [f"    {line}" for line in _by_pattern(layers)]
    if converted.norms:
        lines.append(f"  {len(converted.norms)} norm layers: weight differences")
        lines += [f"    {line}" for line in _by_pattern(dict.fromkeys(converted.norms, ""))]
    for encoder, keys in converted.text_encoders.items():
        modules = {parts[0] if (parts := split_key(key)) else key: "" for key in keys}
        lines.append(f"  {encoder}, not applied (LoRAs apply to the transformer): {len(keys)} tensors on")
        lines += [f"    {line}" for line in _by_pattern(modules)]
    return "\n".join(lines)


def served_transformer() -> tuple[str, ModuleNames]:
    """The layers of the FLUX.1 [dev] transformer the scripts would serve (built from its config,
    on the meta device: no weights are read), and which it is."""
    import torch
    from diffusers import FluxTransformer2DModel

    from flux_lora.dev.model_choice import model_dir_for_scripts
    from flux_lora.models.layout import ModelSource

    config_file = ModelSource(model_dir_for_scripts()).release_dir("dev") / "transformer" / "config.json"
    with torch.device("meta"):
        if config_file.is_file():
            config = json.loads(config_file.read_text())
            model = FluxTransformer2DModel.from_config(config)
            served = f"the transformer in {config_file.parent}"
        else:  # configured weights not fetched yet: FLUX.1 [dev]'s own geometry
            model = FluxTransformer2DModel(guidance_embeds=True)
            served = "FLUX.1 [dev]'s transformer (its weights are not here yet)"
    return served, ModuleNames.of(model)


def _by_pattern(modules: dict[str, str]) -> list[str]:
    """Modules that differ only in a block number, one line each: "blocks.N.attn (N = 0-18): what"."""
    grouped: dict[tuple[str, str], set[int]] = {}
    for module, what in modules.items():
        found = re.search(r"(?<=[._])(\d+)(?=[._])", module)
        pattern = module[: found.start()] + "N" + module[found.end() :] if found else module
        grouped.setdefault((pattern, what), set()).add(int(found[1]) if found else -1)
    lines = []
    for (pattern, what), blocks in sorted(grouped.items()):
        numbered = sorted(block for block in blocks if block >= 0)
        where = f" (N = {_ranges(numbered)})" if numbered else ""
        lines.append(f"{pattern}{where}" + (f": {what}" if what else ""))
    return lines


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
