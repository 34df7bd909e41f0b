"""Which FLUX transformer layer a LoRA file's module name means, in every spelling trainers write.

A key is `<prefix><module>.<role>`. The prefix names the trainer (`transformer.`, `lora_unet_`,
`lycoris_`, `diffusion_model.`, ...); the module comes in the diffusers model's names or in Black
Forest Labs' (BFL) original ones, with dots or with underscores, or in DiffSynth's, OneTrainer's
OMI or XLabs' names. Underscores cannot be turned back into dots by rule (`to_out_0`,
`norm1_context_linear`), so every name is compared in its underscored form against a table
built from the live transformer's own linear layers.

BFL fuses some layers that diffusers keeps apart: `img_attn.qkv` is `to_q`, `to_k` and `to_v`
stacked by rows, a single block's `linear1` is those three and `proj_mlp`. Each such name maps to
several targets, each a row range of the fused weight. All of a fused layer's targets read the
same input, so taking rows of the fused update is exact. BFL's final modulation stores its two
halves (shift, scale) in the other order from diffusers' `norm_out.linear` (scale, shift).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Transformer prefixes, stripped in turn (some trainers write two: `transformer.base_model.model.`).
PREFIXES = (
    "transformer.",
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
    "lora_flux_",
    "unet.",
)
# Text-encoder parts, by encoder. Counted and reported; a LoRA applies to the transformer only.
TEXT_ENCODERS = (
    ("CLIP", ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.", "clip_l.", "te1.", "te.")),
    ("T5", ("lora_te3_", "lora_te2_", "text_encoder_2.", "text_encoders.t5xxl.", "t5.", "te2.")),
    ("embeddings", ("bundle_emb.",)),
)
# diffusers' attention norms -> BFL's names in a double block; a single block's are
# `norm.query_norm` and `norm.key_norm`.
NORMS = {"norm_q": "img_attn.norm.query_norm", "norm_k": "img_attn.norm.key_norm"}
NORMS |= {"norm_added_q": "txt_attn.norm.query_norm", "norm_added_k": "txt_attn.norm.key_norm"}
# Layers schnell does not have (it takes no guidance): a dev LoRA's update there cannot apply.
GUIDANCE = "time_text_embed.guidance_embedder."


@dataclass(frozen=True)
class Target:
    """One diffusers layer that (part of) a file's module updates."""

    module: str  # diffusers module path, e.g. "transformer_blocks.0.attn.to_q"
    rows: slice | None = None  # the rows of the file's (fused) layer that belong to `module`
    swap_halves: bool = False  # BFL's (shift, scale) order against diffusers' (scale, shift)


def text_encoder_of(key: str) -> str | None:
    """The text encoder a key belongs to ("CLIP", "T5", "embeddings"), or None."""
    return next((name for name, marks in TEXT_ENCODERS if key.startswith(marks)), None)


def strip_prefixes(module: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if module.startswith(prefix) and len(module) > len(prefix):
                module, changed = module[len(prefix) :], True
    return module


def underscored(module: str) -> str:
    # kohya-on-diffusers files end every module with "_" (`..._attn_to_k_.lora_down.weight`).
    return module.replace(".", "_").rstrip("_")


def norm_layers(transformer: torch.nn.Module) -> dict[str, int]:
    """The attention's RMS norms (the only other weights FLUX's blocks have) as `name -> width`."""
    return {
        name: module.weight.shape[0]
        for name, module in transformer.named_modules()
        if name.rsplit(".", 1)[-1] in NORMS and getattr(module, "weight", None) is not None
    }


def base_layer(transformer: torch.nn.Module, module: str) -> torch.nn.Module:
    """A layer of the model itself, under any peft adapter wrapping it."""
    layer = transformer.get_submodule(module)
    return layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer


def quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is a tensor subclass that stands for another (torchao's fp8 tensor)."""
    return type(weight.data) is not torch.Tensor and hasattr(weight.data, "dequantize")


def linear_layers(transformer: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Every linear layer of a FLUX transformer as `name -> (out_features, in_features)`, read
    through any peft adapters already on it (their own linear layers are not the model's)."""
    layers = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or re.search(r"\.lora_(A|B|embedding_[AB])\.", name + "."):
            continue
        layers[name.removesuffix(".base_layer")] = (module.out_features, module.in_features)
    return layers


class ModuleNames:
    """The layer(s) of one transformer each spelling of a module name means, and their weights."""

    @classmethod
    def of(cls, transformer: torch.nn.Module) -> ModuleNames:
        return cls(linear_layers(transformer), transformer, norm_layers(transformer))

    def __init__(
        self,
        linears: dict[str, tuple[int, int]],
        transformer: torch.nn.Module | None = None,
        norms: dict[str, int] | None = None,
    ):
        self.linears = linears
        self.norms = norms or {}
        self.norm_table = {}  # underscored name, in any spelling -> diffusers norm
        for norm in self.norms:
            block, _, name = norm.partition(".attn.")
            kind, index = block.rsplit(".", 1)
            if kind == "single_transformer_blocks":
                bfl = f"single_blocks.{index}.norm.{NORMS[name].rsplit('.', 1)[1]}"
            else:
                bfl = f"double_blocks.{index}.{NORMS[name]}"
            self.norm_table[underscored(norm)] = self.norm_table[underscored(bfl)] = norm
        self.transformer = transformer
        # A layer's weight before any update written into it (`ParameterPatches.original_weight`).
        self.pristine: Callable[[str], torch.Tensor | None] | None = None
        # Updates are computed on the serving device and kept in the serving dtype: a full-rank
        # LoKr file is gigabytes of dense updates, and its Kronecker products took 47 s on 2 CPU cores.
        self.dtype = getattr(transformer, "dtype", None) or torch.float32
        self.device = getattr(transformer, "device", None)
        self.table: dict[str, tuple[Target, ...]] = {}
        for name in linears:
            self._add(name, (Target(name),))
        hidden = linears.get("transformer_blocks.0.attn.to_q", linears.get("x_embedder", (0, 0)))[0]
        mlp = next((linears[n][0] for n in linears if n.endswith(("ff.net.0.proj", ".proj_mlp"))), 4 * hidden)
        for block in _blocks(linears, "transformer_blocks"):
            self._double_block(block, hidden)
        for block in _blocks(linears, "single_transformer_blocks"):
            self._single_block(block, hidden, mlp)
        for bfl, diffusers in TOP_LEVEL.items():
            self._add(bfl, (Target(diffusers),))
        self._add("final_layer.adaLN_modulation.1", (Target("norm_out.linear", swap_halves=True),))
        self._add("img_in.proj", (Target("x_embedder"),))  # OneTrainer's OMI spelling
        for layer in ("linear_1", "linear_2"):  # named even on schnell, to say why they cannot apply
            self._add(GUIDANCE + layer, (Target(GUIDANCE + layer),))

    def weight(self, module: str) -> torch.Tensor:
        """A layer's base weight in float32 (an fp8 weight dequantized): what DoRA normalises."""
        if self.pristine is not None and (original := self.pristine(module)) is not None:
            return original.detach().float()  # not another adapter's update written into it
        data = base_layer(self.transformer, module).weight.data
        if quantized(data):
            data = data.dequantize()
        return data.detach().float()

    def has_bias(self, module: str) -> bool:
        return base_layer(self.transformer, module).bias is not None

    def norm(self, module: str) -> str | None:
        """The diffusers norm a file's module name means (BFL's ComfyUI name may end in `.scale`,
        its parameter there, or `.weight`), or None."""
        key = underscored(module)
        for suffix in ("_scale", "_weight"):
            key = key.removesuffix(suffix)
        return self.norm_table.get(key)

    def targets(self, module: str) -> tuple[Target, ...] | None:
        """The targets of a file's module name (prefix already stripped), or None if it names no
        linear layer this table knows."""
        return self.table.get(underscored(module))

    def _add(self, name: str, targets: tuple[Target, ...]) -> None:
        key = underscored(name)
        if key in self.table and self.table[key] != targets:
            raise AssertionError(f"two FLUX layer names read the same underscored: {name}")
        self.table[key] = targets

    def _double_block(self, block: str, hidden: int) -> None:
        d = f"transformer_blocks.{block}"
        image_qkv = tuple(f"{d}.attn.to_{x}" for x in "qkv")
        text_qkv = tuple(f"{d}.attn.add_{x}_proj" for x in "qkv")
        for stream, qkv in (("img", image_qkv), ("txt", text_qkv)):
            fused = _split(qkv, hidden)
            self._add(f"double_blocks.{block}.{stream}_attn.qkv", fused)
            for index, target in enumerate(qkv):  # OneTrainer OMI: one index per part
                self._add(f"double_blocks.{block}.{stream}_attn.qkv.{index}", (Target(target),))
        renamed = {
            "img_attn.proj": "attn.to_out.0",
            "txt_attn.proj": "attn.to_add_out",
            "img_mlp.0": "ff.net.0.proj",
            "img_mlp.2": "ff.net.2",
            "txt_mlp.0": "ff_context.net.0.proj",
            "txt_mlp.2": "ff_context.net.2",
            "img_mod.lin": "norm1.linear",
            "txt_mod.lin": "norm1_context.linear",
        }
        for bfl, diffusers in renamed.items():
            self._add(f"double_blocks.{block}.{bfl}", (Target(f"{d}.{diffusers}"),))
        diffsynth = {"a_to_out": "img_attn.proj", "b_to_out": "txt_attn.proj", "ff_a.0": "img_mlp.0"}
        diffsynth |= {"ff_a.2": "img_mlp.2", "ff_b.0": "txt_mlp.0", "ff_b.2": "txt_mlp.2"}
        diffsynth |= {"norm1_a.linear": "img_mod.lin", "norm1_b.linear": "txt_mod.lin"}
        for theirs, bfl in diffsynth.items():
            prefix = "attn." if theirs.endswith("_out") else ""
            self._add(f"blocks.{block}.{prefix}{theirs}", (Target(f"{d}.{renamed[bfl]}"),))
        self._add(f"blocks.{block}.attn.a_to_qkv", _split(image_qkv, hidden))
        self._add(f"blocks.{block}.attn.b_to_qkv", _split(text_qkv, hidden))
        # XLabs: a processor beside the attention, one LoRA per stream.
        xlabs = {"qkv_lora1": _split(image_qkv, hidden), "qkv_lora2": _split(text_qkv, hidden)}
        xlabs |= {
            "proj_lora1": (Target(f"{d}.attn.to_out.0"),),
            "proj_lora2": (Target(f"{d}.attn.to_add_out"),),
        }
        for name, targets in xlabs.items():
            self._add(f"double_blocks.{block}.processor.{name}", targets)

    def _single_block(self, block: str, hidden: int, mlp: int) -> None:
        s = f"single_transformer_blocks.{block}"
        parts = (f"{s}.attn.to_q", f"{s}.attn.to_k", f"{s}.attn.to_v", f"{s}.proj_mlp")
        linear1 = (*_split(parts[:3], hidden), Target(parts[3], slice(3 * hidden, 3 * hidden + mlp)))
        for name in (f"single_blocks.{block}.linear1", f"single_blocks.{block}.to_qkv_mlp"):
            self._add(name, linear1)
        for index, target in enumerate(parts):
            self._add(f"single_blocks.{block}.linear1.{index}", (Target(target),))
        for name in (f"single_blocks.{block}.linear2", f"single_blocks.{block}.proj_out"):
            self._add(name, (Target(f"{s}.proj_out"),))
        for name in (f"single_blocks.{block}.modulation.lin", f"single_blocks.{block}.norm.linear"):
            self._add(name, (Target(f"{s}.norm.linear"),))
        self._add(f"single_blocks.{block}.processor.qkv_lora", _split(parts[:3], hidden))
        self._add(f"single_blocks.{block}.processor.proj_lora", (Target(f"{s}.proj_out"),))


TOP_LEVEL = {  # BFL -> diffusers, outside the blocks
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": GUIDANCE + "linear_1",
    "guidance_in.out_layer": GUIDANCE + "linear_2",
    "final_layer.linear": "proj_out",
}


def _split(modules: tuple[str, ...], width: int) -> tuple[Target, ...]:
    return tuple(Target(module, slice(i * width, (i + 1) * width)) for i, module in enumerate(modules))


def _blocks(linears: dict[str, tuple[int, int]], kind: str) -> list[str]:
    found = {match[1] for name in linears if (match := re.match(rf"{kind}\.(\d+)\.", name))}
    return sorted(found, key=int)
