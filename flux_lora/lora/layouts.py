"""Which trainer's layout a LoRA file is in, and which adapter type it holds, read from its keys.

Users take FLUX adapters from CivitAI and Hugging Face without knowing their layout. Reading the
keys first lets an error name what the file is, and lets the container refuse an adapter type it
does not apply exactly (LyCORIS LoKr and LoHa, DoRA's magnitude, full weight differences) instead
of loading part of it: diffusers drops DoRA's `dora_scale` with only a warning, for one.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Adapter types by the key fragments that mark them, most specific first. Only "lora" is applied.
ADAPTER_TYPES = (
    ("LyCORIS LoKr (Kronecker product)", (".lokr_w1", ".lokr_w2")),
    ("LyCORIS LoHa (Hadamard product)", (".hada_w1_a", ".hada_w2_a")),
    ("DoRA (a magnitude vector beside the LoRA)", (".dora_scale", ".lora_magnitude_vector")),
    ("full weight differences (.diff, .diff_b)", (".diff", ".diff_b")),
)
LORA = "LoRA"
# Layouts by key prefix or fragment, as the trainers and loaders write them.
LAYOUTS = (
    ("OneTrainer", ("lora_transformer_",)),
    ("SimpleTuner LyCORIS", ("lycoris_",)),
    ("kohya (sd-scripts)", ("lora_unet_",)),
    ("BFL / ComfyUI", ("diffusion_model.",)),
    ("fal (peft's base_model.model.)", ("base_model.model.",)),
    ("XLabs", (".processor.",)),
    ("diffusers / peft", ("transformer.",)),
)
TEXT_ENCODER_MARKS = ("lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "text_encoder")


@dataclass(frozen=True)
class Layout:
    layout: str  # the trainer's naming, e.g. "kohya (sd-scripts)"
    adapter: str  # LORA, or one of ADAPTER_TYPES' names
    marked_by: str  # a key that shows it, for messages
    text_encoder_keys: int

    @property
    def applied(self) -> bool:
        """Whether this container applies the adapter type exactly (plain LoRA only, for now)."""
        return self.adapter == LORA

    def describe(self) -> str:
        te = f", {self.text_encoder_keys} text-encoder tensors" if self.text_encoder_keys else ""
        return f"{self.adapter} in the {self.layout} layout (e.g. {self.marked_by}{te})"


def detect(keys: Iterable[str]) -> Layout:
    """The layout and adapter type of a file with these tensor names."""
    keys = list(keys)
    adapter, adapter_key = LORA, ""
    for name, marks in ADAPTER_TYPES:
        found = next((key for key in keys if any(_marks(key, mark) for mark in marks)), None)
        if found is not None:
            adapter, adapter_key = name, found
            break
    layout, layout_key = "unknown", keys[0] if keys else ""
    for name, marks in LAYOUTS:
        found = next((key for key in keys if any(mark in key for mark in marks)), None)
        if found is not None:
            layout, layout_key = name, found
            break
    text_encoder = sum(1 for key in keys if any(mark in key for mark in TEXT_ENCODER_MARKS))
    return Layout(layout, adapter, adapter_key or layout_key, text_encoder)


def _marks(key: str, mark: str) -> bool:
    # ".diff" must end a name segment: "...img_attn.qkv.diff" yes, "...diffusion_model..." no.
    if mark in (".diff", ".diff_b"):
        return key.endswith(mark)
    return mark in key
