"""`python -m flux_lora resolve-lora --file FILE`: what a local LoRA file is, read as a load
reads it, and which transformer layers it touches, by block range."""

from __future__ import annotations

import re
from pathlib import Path

from flux_lora.lora.adapters import read_lora


def describe_file(path: str) -> str:
    """What a local LoRA file is and which transformer layers it touches: `resolve-lora --file FILE`.
    Raises InputError as a load would, for a file this container refuses."""
    from flux_lora import third_party_logs

    third_party_logs.install()  # as setup does: diffusers' import would log them here
    weights = read_lora(path, "file", Path(path).name)
    lines = [f"{path}: {weights.layout.describe()}"]
    if weights.text_encoder_keys:  # counted in the file's own keys by the layout line above
        lines.append("  text encoders: not applied (the transformer part is)")
    if not weights.state_dict:
        lines.append("  no transformer layers: a load would fail")
        return "\n".join(lines)
    modules: dict[str, set[int]] = {}
    ranks = set()
    for key, value in weights.state_dict.items():
        module, _, kind = key.partition(".lora_")
        if kind.startswith("A"):
            ranks.add(value.shape[0])
        pattern = re.sub(r"\.(\d+)\.", ".N.", module, count=1)
        found = re.search(r"\.(\d+)\.", module)
        modules.setdefault(pattern, set()).add(int(found[1]) if found else -1)
    layers = sum(len(blocks) for blocks in modules.values())
    lines.append(f"  {layers} transformer layers, rank {', '.join(map(str, sorted(ranks)))}:")
    for pattern, blocks in sorted(modules.items()):
        numbered = sorted(block for block in blocks if block >= 0)
        where = f" (N = {_ranges(numbered)})" if numbered else ""
        lines.append(f"    {pattern}{where}")
    return "\n".join(lines)


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
