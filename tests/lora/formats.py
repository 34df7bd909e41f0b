"""Adapter files in every layout the container reads, each with the update it must make to every
layer, computed here by each format's own definition (not by the container's code).

The mapping from a trainer's names to diffusers' layers is written out again by hand, from the
trainers' sources: BFL's fused `qkv` is to_q, to_k, to_v by rows; a single block's `linear1` adds
proj_mlp; BFL's final modulation has its halves swapped against diffusers' `norm_out.linear`.
Sizes are the tiny FLUX's (hidden width H, MLP width M), or any other's given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Written:
    """A file's tensors and, per diffusers layer, the (weight, bias) update it defines at scale 1."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    expected: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    header: dict[str, str] | None = None
    text_encoder_tensors: int = 0
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # norm -> its weight's update


class Writer:
    def __init__(self, hidden: int, mlp: int, seed: int, base: Callable[[str], torch.Tensor] | None):
        self.h, self.m = hidden, mlp
        self.g = torch.Generator().manual_seed(seed)
        self.file = Written()
        self.base = base  # a layer's weight: DoRA's update depends on it

    # -- tensors ---------------------------------------------------------------------------------
    def rand(self, *shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * 0.2

    def lora(
        self,
        module: str,
        out: int,
        inputs: int,
        rank: int,
        roles=("lora_down.weight", "lora_up.weight"),
        alpha: float | None = None,
    ) -> torch.Tensor:
        """A LoRA pair under `module`; returns its update: (alpha / rank) up @ down, or up @ down."""
        down, up = self.rand(rank, inputs), self.rand(out, rank)
        self.file.tensors[f"{module}.{roles[0]}"] = down
        self.file.tensors[f"{module}.{roles[1]}"] = up
        if alpha is not None:
            self.file.tensors[f"{module}.alpha"] = torch.tensor(alpha)
        return (alpha / rank if alpha is not None else 1.0) * up @ down

    def loha(self, module: str, out: int, inputs: int, rank: int, alpha: float) -> torch.Tensor:
        w1a, w1b, w2a, w2b = (
            self.rand(out, rank),
            self.rand(rank, inputs),
            self.rand(out, rank),
            self.rand(rank, inputs),
        )
        for name, tensor in zip(
            ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), (w1a, w1b, w2a, w2b), strict=True
        ):
            self.file.tensors[f"{module}.{name}"] = tensor
        self.file.tensors[f"{module}.alpha"] = torch.tensor(alpha)
        return (alpha / rank) * (w1a @ w1b) * (w2a @ w2b)

    def lokr(
        self,
        module: str,
        w1: tuple[int, int],
        w2: tuple[int, int],
        *,
        rank1: int = 0,
        rank2: int = 0,
        alpha: float | None = None,
    ) -> torch.Tensor:
        """A LyCORIS LoKr: each factor whole (rank 0) or a product. Scale as LyCORIS: alpha / the
        decomposed factor's rank (W2's first), 1 when both are whole whatever the alpha."""
        factors = []
        for side, shape, rank in (("w1", w1, rank1), ("w2", w2, rank2)):
            if rank:
                a, b = self.rand(shape[0], rank), self.rand(rank, shape[1])
                self.file.tensors[f"{module}.lokr_{side}_a"] = a
                self.file.tensors[f"{module}.lokr_{side}_b"] = b
                factors.append(a @ b)
            else:
                whole = self.rand(*shape)
                self.file.tensors[f"{module}.lokr_{side}"] = whole
                factors.append(whole)
        if alpha is not None:
            self.file.tensors[f"{module}.alpha"] = torch.tensor(alpha)
        rank = rank2 or rank1
        scale = alpha / rank if alpha is not None and rank else 1.0
        return scale * torch.kron(factors[0], factors[1])

    def dora(
        self, key: str, parts: list[str], delta: torch.Tensor, per: str, shape: tuple[int, ...]
    ) -> torch.Tensor:
        """A DoRA magnitude for the layer `parts` make up (stacked by rows) under `key`; returns
        the update at strength 1 as ComfyUI defines it: W_dora - W, with V = W + delta rescaled to
        norms m by rows ("rows") or columns ("columns")."""
        weight = torch.cat([self.base(part) for part in parts])
        adapted = weight + delta
        dim = 1 if per == "rows" else 0
        norms = adapted.norm(dim=dim, keepdim=True)
        magnitude = norms * (1 + 0.2 * torch.rand(norms.shape, generator=self.g))
        self.file.tensors[key] = magnitude.reshape(shape)
        return magnitude / (norms + torch.finfo(torch.float32).eps) * adapted - weight

    # -- where updates land -----------------------------------------------------------------------
    def expect(self, module: str, weight: torch.Tensor | None, bias: torch.Tensor | None = None) -> None:
        assert module not in self.file.expected, module
        self.file.expected[module] = (weight, bias)

    def expect_rows(self, parts: list[str], full: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """A fused layer's update split by rows: H rows each, the last part takes the rest."""
        start = 0
        for index, module in enumerate(parts):
            stop = full.shape[0] if index == len(parts) - 1 else start + self.h
            self.expect(module, full[start:stop], None if bias is None else bias[start:stop])
            start = stop

    def text_encoder(self, *keys: str) -> None:
        for key in keys:
            self.file.tensors[key] = self.rand(2, 8)
        self.file.text_encoder_tensors += len(keys)


D, S = "transformer_blocks.0", "single_transformer_blocks.0"
IMAGE_QKV = [f"{D}.attn.to_q", f"{D}.attn.to_k", f"{D}.attn.to_v"]
TEXT_QKV = [f"{D}.attn.add_q_proj", f"{D}.attn.add_k_proj", f"{D}.attn.add_v_proj"]
LINEAR1 = [f"{S}.attn.to_q", f"{S}.attn.to_k", f"{S}.attn.to_v", f"{S}.proj_mlp"]


def swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2)
    return torch.cat([second, first])


def kohya(w: Writer) -> None:
    """sd-scripts: BFL names, underscores, alphas; CLIP (te1) and T5 (te3) parts."""
    h, m = w.h, w.m
    w.expect_rows(IMAGE_QKV, w.lora("lora_unet_double_blocks_0_img_attn_qkv", 3 * h, h, 4, alpha=2.0))
    w.expect_rows(LINEAR1, w.lora("lora_unet_single_blocks_0_linear1", 3 * h + m, h, 4, alpha=8.0))
    w.expect(f"{D}.norm1.linear", w.lora("lora_unet_double_blocks_0_img_mod_lin", 6 * h, h, 2, alpha=1.0))
    final = w.lora("lora_unet_final_layer_adaLN_modulation_1", 2 * h, h, 2, alpha=2.0)
    w.expect("norm_out.linear", swap_halves(final))
    w.expect("proj_out", w.lora("lora_unet_final_layer_linear", 64, h, 2, alpha=2.0))
    w.text_encoder(
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
    )


def bfl_biases(w: Writer) -> None:
    """ComfyUI / BFL: `diffusion_model.`, lora_A/B with lora_B.bias, and bias differences."""
    h, m = w.h, w.m
    full = w.lora(
        "diffusion_model.double_blocks.0.txt_attn.qkv", 3 * h, h, 3, roles=("lora_A.weight", "lora_B.weight")
    )
    bias = w.file.tensors["diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.bias"] = w.rand(3 * h)
    w.expect_rows(TEXT_QKV, full, bias)
    w.expect(
        f"{S}.proj_out",
        w.lora(
            "diffusion_model.single_blocks.0.linear2", h, h + m, 2, roles=("lora_A.weight", "lora_B.weight")
        ),
    )
    only_bias = w.file.tensors["diffusion_model.double_blocks.0.img_attn.proj.diff_b"] = w.rand(h)
    w.expect(f"{D}.attn.to_out.0", None, only_bias)


def onetrainer(w: Writer) -> None:
    """OneTrainer's default: diffusers names with underscores, every kind of layer, T5 (te2)."""
    h, m = w.h, w.m
    for module, out, inputs in (
        (f"{S}.proj_mlp", m, h),
        (f"{S}.proj_out", h, h + m),
        (f"{S}.norm.linear", 3 * h, h),
        (f"{D}.ff_context.net.0.proj", m, h),
        (f"{D}.attn.to_out.0", h, h),
        (f"{D}.norm1_context.linear", 6 * h, h),
        ("time_text_embed.guidance_embedder.linear_1", h, 256),
    ):
        w.expect(module, w.lora("lora_transformer_" + module.replace(".", "_"), out, inputs, 2, alpha=1.0))
    w.text_encoder("lora_te2_encoder_block_0_layer_1_DenseReluDense_wi_0.lora_up.weight", "bundle_emb.tok.t5")


def onetrainer_omi(w: Writer) -> None:
    """OneTrainer's OMI format: BFL names under `transformer.`, fused layers split by an index."""
    h = w.h
    w.expect(IMAGE_QKV[1], w.lora("transformer.double_blocks.0.img_attn.qkv.1", h, h, 2, alpha=4.0))
    w.expect(LINEAR1[3], w.lora("transformer.single_blocks.0.linear1.3", w.m, h, 2, alpha=4.0))
    w.expect("x_embedder", w.lora("transformer.img_in.proj", h, 64, 2, alpha=4.0))


def simpletuner_locon(w: Writer) -> None:
    """SimpleTuner's LyCORIS LoRA (LoCon): `lycoris_` and diffusers names with underscores."""
    h = w.h
    w.expect(f"{D}.attn.to_q", w.lora("lycoris_transformer_blocks_0_attn_to_q", h, h, 4, alpha=1.0))
    w.expect(f"{S}.attn.to_v", w.lora("lycoris_single_transformer_blocks_0_attn_to_v", h, h, 4, alpha=1.0))


def simpletuner_lokr(w: Writer) -> None:
    """SimpleTuner's default LoKr: whole factors (alpha 10000, ignored), two factor sizes in one file."""
    h = w.h
    w.expect(
        f"{D}.attn.to_q", w.lokr("lycoris_transformer_blocks_0_attn_to_q", (4, 4), (8, 8), alpha=10000.0)
    )
    w.expect(
        f"{D}.ff.net.0.proj",
        w.lokr("lycoris_transformer_blocks_0_ff_net_0_proj", (2, 2), (w.m // 2, h // 2), alpha=10000.0),
    )


def kohya_lokr(w: Writer) -> None:
    """LyCORIS through sd-scripts: a fused BFL layer with W2 decomposed, and both decomposed."""
    h = w.h
    w.expect_rows(
        IMAGE_QKV,
        w.lokr("lora_unet_double_blocks_0_img_attn_qkv", (6, 4), (3 * h // 6, h // 4), rank2=2, alpha=1.0),
    )
    w.expect(
        f"{S}.proj_out",
        w.lokr(
            "lora_unet_single_blocks_0_linear2",
            (4, 10),
            (h // 4, (h + w.m) // 10),
            rank1=2,
            rank2=2,
            alpha=3.0,
        ),
    )


def loha(w: Writer) -> None:
    """LyCORIS LoHa, on a diffusers layer and on a fused BFL one."""
    h = w.h
    w.expect(
        f"{D}.attn.add_q_proj", w.loha("lycoris_transformer_blocks_0_attn_add_q_proj", h, h, 2, alpha=1.0)
    )
    w.expect_rows(LINEAR1, w.loha("lora_unet_single_blocks_0_linear1", 3 * h + w.m, h, 3, alpha=2.0))


def diffsynth(w: Writer) -> None:
    """DiffSynth-Studio's own names, peft's `.default` adapter, no alpha."""
    h = w.h
    roles = ("lora_A.default.weight", "lora_B.default.weight")
    w.expect_rows(IMAGE_QKV, w.lora("blocks.0.attn.a_to_qkv", 3 * h, h, 2, roles=roles))
    w.expect_rows(LINEAR1, w.lora("single_blocks.0.to_qkv_mlp", 3 * h + w.m, h, 2, roles=roles))
    w.expect(f"{D}.norm1_context.linear", w.lora("blocks.0.norm1_b.linear", 6 * h, h, 2, roles=roles))


def fal(w: Writer) -> None:
    """fal's Kontext trainer: BFL names under peft's `base_model.model.`, a few layers only."""
    h, roles = w.h, ("lora_A.weight", "lora_B.weight")
    w.expect_rows(TEXT_QKV, w.lora("base_model.model.double_blocks.0.txt_attn.qkv", 3 * h, h, 2, roles=roles))
    w.expect(f"{D}.ff.net.2", w.lora("base_model.model.double_blocks.0.img_mlp.2", h, w.m, 2, roles=roles))


def simpletuner_wrapped(w: Writer) -> None:
    """An early SimpleTuner bug: `transformer.base_model.model.` before diffusers names."""
    roles = ("lora_A.weight", "lora_B.weight")
    w.expect(
        f"{S}.attn.to_q",
        w.lora(
            "transformer.base_model.model.single_transformer_blocks.0.attn.to_q", w.h, w.h, 2, roles=roles
        ),
    )


def kohya_on_diffusers(w: Writer) -> None:
    """sd-scripts on the diffusers model: diffusers names, underscores, a trailing underscore."""
    w.expect(
        f"{S}.attn.to_k", w.lora("lora_unet_single_transformer_blocks_0_attn_to_k_", w.h, w.h, 2, alpha=1.0)
    )
    w.expect("proj_out", w.lora("lora_unet_proj_out_", 64, w.h, 2, alpha=1.0))


def mixture(w: Writer) -> None:
    """A peft half and a kohya half in one file (diffusers keeps only the peft half)."""
    roles = ("lora_A.weight", "lora_B.weight")
    w.expect(f"{D}.attn.to_k", w.lora("transformer.transformer_blocks.0.attn.to_k", w.h, w.h, 2, roles=roles))
    w.expect(f"{S}.proj_out", w.lora("lora_unet_single_blocks_0_linear2", w.h, w.h + w.m, 2, alpha=1.0))


def differences(w: Writer) -> None:
    """ComfyUI's full differences: a whole weight difference and its bias difference."""
    diff, diff_b = w.rand(w.h, w.m), w.rand(w.h)
    w.file.tensors["diffusion_model.double_blocks.0.img_mlp.2.diff"] = diff
    w.file.tensors["diffusion_model.double_blocks.0.img_mlp.2.diff_b"] = diff_b
    w.expect(f"{D}.ff.net.2", diff, diff_b)


def peft_metadata(w: Writer) -> None:
    """diffusers' own save: scales in the header's peft config (lora_alpha, alpha_pattern)."""
    import json

    roles = ("lora_A.weight", "lora_B.weight")
    w.expect(f"{D}.attn.to_v", 2.0 * w.lora(f"transformer.{D}.attn.to_v", w.h, w.h, 4, roles=roles))
    w.expect("proj_out", 0.5 * w.lora("transformer.proj_out", 64, w.h, 4, roles=roles))
    config = {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern": {"^proj_out": 2}}
    w.file.header = {"lora_adapter_metadata": json.dumps(config)}


def xlabs(w: Writer) -> None:
    """XLabs: a processor beside each double block's attention, no alpha."""
    h, roles = w.h, ("down.weight", "up.weight")
    w.expect_rows(IMAGE_QKV, w.lora("double_blocks.0.processor.qkv_lora1", 3 * h, h, 2, roles=roles))
    w.expect(f"{D}.attn.to_add_out", w.lora("double_blocks.0.processor.proj_lora2", h, h, 2, roles=roles))


def dora_peft(w: Writer) -> None:
    """peft's DoRA: `lora_magnitude_vector`, one norm per output row."""
    module, roles = f"transformer.{D}.attn.to_q", ("lora_A.weight", "lora_B.weight")
    delta = w.lora(module, w.h, w.h, 2, roles=roles)
    w.expect(IMAGE_QKV[0], w.dora(f"{module}.lora_magnitude_vector", IMAGE_QKV[:1], delta, "rows", (w.h,)))


def dora_lycoris(w: Writer) -> None:
    """LyCORIS's DoRA on a fused BFL layer: `dora_scale` (out, 1), norms over the fused rows."""
    module = "lora_unet_double_blocks_0_txt_attn_qkv"
    delta = w.lora(module, 3 * w.h, w.h, 2, alpha=1.0)
    w.expect_rows(TEXT_QKV, w.dora(f"{module}.dora_scale", TEXT_QKV, delta, "rows", (3 * w.h, 1)))


def dora_onetrainer(w: Writer) -> None:
    """OneTrainer's DoRA: `dora_scale` (1, in), one norm per input column."""
    module = f"lora_transformer_{S.replace('.', '_')}_proj_out"
    delta = w.lora(module, w.h, w.h + w.m, 2, alpha=1.0)
    parts = [f"{S}.proj_out"]
    w.expect(parts[0], w.dora(f"{module}.dora_scale", parts, delta, "columns", (1, w.h + w.m)))


def norm_differences(w: Writer) -> None:
    """ComfyUI's differences on the attention's RMS norms (BFL names: `query_norm.scale`), beside
    a bias difference."""
    head = w.h // 2  # the tiny model's head width; the norms are that wide
    for key, norm in (
        ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.scale.diff", f"{D}.attn.norm_q"),
        ("diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale.diff", f"{D}.attn.norm_added_k"),
        ("diffusion_model.single_blocks.0.norm.key_norm.diff", f"{S}.attn.norm_k"),
        ("lycoris_single_transformer_blocks_0_attn_norm_q.w_norm", f"{S}.attn.norm_q"),  # LyCORIS "norm"
    ):
        w.file.norms[norm] = w.file.tensors[key] = w.rand(head)
    bias = w.file.tensors["diffusion_model.single_blocks.0.linear2.diff_b"] = w.rand(w.h)
    w.expect(f"{S}.proj_out", None, bias)


LAYOUTS = {
    "kohya": kohya,
    "BFL with biases": bfl_biases,
    "OneTrainer": onetrainer,
    "OneTrainer OMI": onetrainer_omi,
    "SimpleTuner LoCon": simpletuner_locon,
    "SimpleTuner LoKr": simpletuner_lokr,
    "kohya LoKr": kohya_lokr,
    "LoHa": loha,
    "DiffSynth": diffsynth,
    "fal": fal,
    "SimpleTuner base_model": simpletuner_wrapped,
    "kohya on diffusers": kohya_on_diffusers,
    "peft + kohya mixture": mixture,
    "weight and bias differences": differences,
    "peft metadata": peft_metadata,
    "XLabs": xlabs,
    "DoRA (peft)": dora_peft,
    "DoRA (LyCORIS, fused)": dora_lycoris,
    "DoRA (OneTrainer)": dora_onetrainer,
    "norm differences": norm_differences,
}


def write(
    layout: str,
    hidden: int = 32,
    mlp: int = 128,
    seed: int = 0,
    base: Callable[[str], torch.Tensor] | None = None,
) -> Written:
    """`base` gives a layer's weight (float32), which DoRA files need."""
    writer = Writer(hidden, mlp, seed, base)
    LAYOUTS[layout](writer)
    return writer.file
