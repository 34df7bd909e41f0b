"""Which trainer's layout a LoRA file is in, read from its keys: named in messages and by
`resolve-lora --file FILE`, so a user learns what a file is before it is served.

Users take FLUX adapters from CivitAI and Hugging Face without knowing their layout. The layout
names only the spelling; the adapter types a file holds (LoRA, LoKr, LoHa, differences) are read
from its tensors' roles as it is converted (`flux_lora.lora.convert`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Layouts by key prefix (or, starting with ".", a fragment anywhere), as the trainers and loaders
# write them; most specific first.
LAYOUTS = (
    ("OneTrainer", ("lora_transformer_",)),
    ("SimpleTuner LyCORIS", ("lycoris_",)),
    ("kohya (sd-scripts)", ("lora_unet_",)),
    ("BFL / ComfyUI", ("diffusion_model.",)),
    ("fal (peft's base_model.model.)", ("base_model.model.",)),
    ("XLabs", (".processor.",)),
    ("DiffSynth", ("blocks.",)),
    ("OneTrainer OMI", ("transformer.double_blocks.", "transformer.single_blocks.")),
    ("BFL", ("double_blocks.", "single_blocks.")),
    ("diffusers / peft", ("transformer.", "transformer_blocks.", "single_transformer_blocks.")),
)


@dataclass(frozen=True)
class Layout:
    layout: str  # the trainer's naming, e.g. "kohya (sd-scripts)"
    marked_by: str  # a key that shows it, for messages

    def describe(self, kinds: Iterable[str] = ()) -> str:
        kinds = sorted(kinds)
        what = " + ".join(kinds) if kinds else "an adapter"
        return f"{what} in the {self.layout} layout (e.g. {self.marked_by})"


def detect(keys: Iterable[str]) -> Layout:
    """The layout of a file with these tensor names: the first layout any key shows."""
    keys = sorted(keys, key=lambda key: (key.endswith(".alpha"), key))  # a weight's key shows more
    for name, marks in LAYOUTS:
        found = next((key for key in keys if any(_shows(key, mark) for mark in marks)), None)
        if found is not None:
            return Layout(name, found)
    return Layout("unknown", keys[0] if keys else "no keys")


def _shows(key: str, mark: str) -> bool:
    return mark in key if mark.startswith(".") else key.startswith(mark)
