"""A LoRA file, in any layout and of any adapter type we apply, as one update per transformer
layer in diffusers' names: our own reading, with no diffusers converter in the path.

diffusers 0.42.1's converters drop parts of files without a word (DoRA magnitudes, non-zero bias
differences, T5 layers, the kohya half of a mixed file, SimpleTuner's `lycoris_` LoRAs) and raise
on others (OneTrainer files that train more than attention, partial fal files). Here every tensor
of a file is either applied, counted as a text-encoder part, or the reason the file is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from flux_lora.errors import InputError
from flux_lora.lora.formulas import update_of
from flux_lora.lora.layouts import Layout, detect
from flux_lora.lora.names import GUIDANCE, ModuleNames, strip_prefixes, text_encoder_of
from flux_lora.lora.updates import NORM_DIFF, Update, halves_swapped, split_key

METADATA_KEY = "lora_adapter_metadata"  # diffusers' header entry: the peft config, JSON


@dataclass(frozen=True)
class Converted:
    updates: dict[str, Update]  # diffusers module path -> its update
    norms: dict[str, torch.Tensor]  # diffusers norm path -> the difference of its weight
    text_encoders: dict[str, list[str]]  # "CLIP" / "T5" / "embeddings" -> keys not applied
    skipped: tuple[str, ...]  # layers this transformer lacks (a dev LoRA's guidance on schnell)
    layout: Layout

    @property
    def kinds(self) -> set[str]:
        kinds = {kind for update in self.updates.values() for kind in update.kinds}
        return kinds | ({NORM_DIFF} if self.norms else set())

    def describe(self) -> str:
        te = ", ".join(f"{len(keys)} {name} tensors" for name, keys in self.text_encoders.items())
        return self.layout.describe(self.kinds) + (f", and {te}" if te else "")


def convert(
    tensors: dict[str, torch.Tensor], header: dict[str, str] | None, names: ModuleNames, where: str
) -> Converted:
    """Every tensor of a file, placed: raises InputError naming what cannot be."""
    layout = detect(tensors)
    text_encoders: dict[str, list[str]] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key in sorted(tensors):  # one order whatever the header's: the same file, the same message
        tensor = tensors[key]
        if encoder := text_encoder_of(key):
            text_encoders.setdefault(encoder, []).append(key)
        elif parts := split_key(key):
            module, role = parts
            groups.setdefault(module, {})[role] = tensor
        else:
            unknown.append(key)
    if any(key.endswith(("query_norm.scale", "key_norm.scale")) for key in unknown):
        raise InputError(
            f"{where} replaces norm scales (e.g. {next(k for k in sorted(unknown) if k.endswith('norm.scale'))}), "
            "as BFL's control LoRAs (Canny, Depth) do: they need a control image this container does not "
            "take. Use it with FLUX.1's control pipelines instead."
        )
    if unknown:
        raise InputError(
            f"{where}: {len(unknown)} tensor(s) are of no adapter type this container knows "
            f"(e.g. {', '.join(sorted(unknown)[:3])}); it applies LoRA, LyCORIS LoKr and LoHa, DoRA, and "
            "weight and bias differences. Is it an adapter for FLUX.1 [dev] or [schnell]?"
        )
    scales = _metadata_scales(header)
    updates: dict[str, Update] = {}
    norms: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    skipped: list[str] = []
    unmatched: list[str] = []
    for module, group in groups.items():
        bare = strip_prefixes(module)
        targets = names.targets(bare)
        norm = names.norm(bare) if targets is None else None
        if targets is None and norm is None:
            unmatched.append(module)
            continue
        if names.device is not None and names.device.type != "meta":
            group = {role: tensor.to(names.device) for role, tensor in group.items()}
        if norm is not None:
            _once(norm, module, sources, where)
            norms[norm] = _norm_difference(module, group, norm, names.norms[norm], where)
            continue
        if absent := [t.module for t in targets if t.module not in names.linears]:
            if all(name.startswith(GUIDANCE) for name in absent):
                skipped.extend(absent)
                targets = tuple(t for t in targets if t.module in names.linears)
            else:
                unmatched.append(module)
                continue

        def fused_weight(targets=targets) -> torch.Tensor:
            """The file's layer as it was trained: its targets' weights by rows, in its order."""
            parts = [names.weight(t.module) for t in targets]
            return torch.cat(
                [halves_swapped(w) if t.swap_halves else w for t, w in zip(targets, parts, strict=True)]
            )

        update = update_of(module, group, _scale_for(bare, group, scales), where, fused_weight)
        fused = [target.rows.stop for target in targets if target.rows is not None]
        if fused and update.out_features != fused[-1]:
            raise InputError(
                f"{where}: {module} updates {update.out_features} rows, and the fused layer it names has "
                f"{fused[-1]} ({', '.join(t.module.rsplit('.', 1)[-1] for t in targets)}). Is it a LoRA for "
                "FLUX.1 [dev] or [schnell], not another model?"
            )
        for target in targets:
            part = update.rows(target.rows, target.swap_halves).to(names.dtype)
            _check_shape(part, target.module, names, module, where)
            _once(target.module, module, sources, where)
            updates[target.module] = part
    if unmatched:
        sample = ", ".join(sorted(unmatched)[:3])
        if not updates and not norms:
            raise InputError(
                f"{where}: no key matches a FLUX transformer layer (its modules look like {sample}). "
                "Is it a LoRA for FLUX.1 [dev] or [schnell]?"
            )
        raise InputError(
            f"{where}: {len(unmatched)} of its {len(groups)} modules match no FLUX transformer layer "
            f"(e.g. {sample}), so it would load only in part. Is it a LoRA for FLUX.1 [dev] or [schnell]?"
        )
    return Converted(updates, norms, text_encoders, tuple(sorted(set(skipped))), layout)


def _norm_difference(
    module: str, group: dict[str, torch.Tensor], norm: str, width: int, where: str
) -> torch.Tensor:
    """A norm weight's difference (ComfyUI's `.diff` on `query_norm.scale`): the only update a
    norm takes."""
    difference = group.get("diff")
    if set(group) != {"diff"} or difference.numel() != width:
        shapes = {role: tuple(tensor.shape) for role, tensor in group.items()}
        raise InputError(
            f"{where}: {module} names the norm {norm} (width {width}) with {shapes}; a norm takes only a "
            "weight difference (.diff) of its width. Is it an adapter for FLUX.1?"
        )
    return difference.float().flatten()


def _once(layer: str, module: str, sources: dict[str, str], where: str) -> None:
    """Notes that the file's `module` updates `layer`; raises if another of its modules did."""
    if layer in sources:
        raise InputError(
            f"{where}: both {sources[layer]} and {module} update {layer}; a file that updates a layer "
            "twice is ambiguous. Ask its author for a file in one layout."
        )
    sources[layer] = module


def _check_shape(part: Update, target: str, names: ModuleNames, module: str, where: str) -> None:
    """The update fits the layer: its shape, and a bias update only where the layer has a bias."""
    out_features, in_features = names.linears[target]
    inputs = part.in_features or in_features
    if part.bias is not None and not names.has_bias(target):
        raise InputError(
            f"{where}: {module} updates the bias of {target}, which has none. Is it an adapter for FLUX.1?"
        )
    if (part.out_features, inputs) == (out_features, in_features):
        return
    if target == "x_embedder" and inputs > in_features:
        raise InputError(
            f"{where} widens the image input ({module} takes {inputs} channels, FLUX.1 has "
            f"{in_features}): it is a control LoRA (Canny, Depth or Fill), which needs a control "
            "image this container does not take. Use it with FLUX.1's control pipelines instead."
        )
    raise InputError(
        f"{where}: {module} updates a {part.out_features} x {inputs} weight, and {target} is "
        f"{out_features} x {in_features}. Is it a LoRA for FLUX.1 [dev] or [schnell], not another model?"
    )


def _metadata_scales(header: dict[str, str] | None) -> dict | None:
    """The peft config diffusers writes into a file's header (`r`, `lora_alpha`, patterns), or
    None. A pipeline's save prefixes its entries with `transformer.`."""
    raw = (header or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        config = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(config, dict):
        return None
    prefixed = {k.removeprefix("transformer."): v for k, v in config.items() if k.startswith("transformer.")}
    return prefixed or config


def _scale_for(module: str, group: dict[str, torch.Tensor], config: dict | None) -> float | None:
    """A LoRA's scale from the header's peft config, as peft computes it (alpha / rank, or alpha
    / sqrt(rank) with rsLoRA): only when the module has no `.alpha` of its own."""
    if config is None or "alpha" in group or "down" not in group:
        return None
    from peft.utils.other import get_pattern_key

    rank = group["down"].shape[0]
    alphas = config.get("alpha_pattern") or {}
    alpha = alphas.get(get_pattern_key(alphas.keys(), module), config.get("lora_alpha"))
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        return None
    return float(alpha) / (rank**0.5 if config.get("use_rslora") else rank)
