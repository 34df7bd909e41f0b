"""What each adapter type costs as an exact update, and what a compiled transformer's slot (rank
64 by default) loses when the update's rank is higher: one FLUX.1 layer per type, full size,
random factors of the shapes trainers write.

    .venv/bin/python bench/lora_ranks.py [--slot-rank 64] [--whole-file]

`--whole-file` also converts a whole SimpleTuner-default LoKr file (whole factors, 16 on
attention, 8 on feed-forward: 342 layers) for a full-size FLUX.1 served in bf16, and reports the
time and the process's peak memory.

Random factors have flat singular value spectra, so the relative errors printed are near the
worst a file of that shape can show; trained adapters concentrate their energy in fewer
directions. Real published files have not been measured here.
"""

from __future__ import annotations

import argparse
import re
import resource
import time

import torch

from flux_lora.lora.formulas import update_of
from flux_lora.lora.slots import best_of_rank

H, M = 3072, 12288


def cases(g: torch.Generator) -> dict[str, tuple[tuple[int, int], dict[str, torch.Tensor]]]:
    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.01

    return {
        "LoRA rank 16 (attention, 3072x3072)": ((H, H), {"down": rand(16, H), "up": rand(H, 16)}),
        "LoRA rank 128 (attention)": ((H, H), {"down": rand(128, H), "up": rand(H, 128)}),
        "LoHa rank 8 (attention)": ((H, H), {k: rand(*s) for k, s in _loha(8).items()}),
        "LoHa rank 16 (attention)": ((H, H), {k: rand(*s) for k, s in _loha(16).items()}),
        "LoKr whole factors 16x16, 192x192 (SimpleTuner default)": (
            (H, H),
            {"lokr_w1": rand(16, 16), "lokr_w2": rand(192, 192), "alpha": torch.tensor(10000.0)},
        ),
        "LoKr 48x64 whole, W2 rank 16 (factor -1)": (
            (H, H),
            {
                "lokr_w1": rand(48, 64),
                "lokr_w2_a": rand(64, 16),
                "lokr_w2_b": rand(16, 48),
                "alpha": torch.tensor(16.0),
            },
        ),
        "LoKr whole 8x8, 1536x384 (feed-forward, 12288x3072)": (
            (M, H),
            {"lokr_w1": rand(8, 8), "lokr_w2": rand(M // 8, H // 8)},
        ),
        "weight difference (attention)": ((H, H), {"diff": rand(H, H)}),
    }


def _loha(rank: int) -> dict[str, tuple[int, int]]:
    return {"hada_w1_a": (H, rank), "hada_w1_b": (rank, H), "hada_w2_a": (H, rank), "hada_w2_b": (rank, H)}


ATTENTION = re.compile(r".*\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$")
FEED_FORWARD = re.compile(r".*\.ff(_context)?\.net\.(0\.proj|2)$")


def simpletuner_lokr(g: torch.Generator, linears: dict[str, tuple[int, int]]) -> dict[str, torch.Tensor]:
    """SimpleTuner's default LyCORIS LoKr for a transformer with these linear layers: every
    Attention layer with factor 16 and every FeedForward one with factor 8, whole factors, bf16
    (342 layers on FLUX.1)."""
    tensors = {}
    for name, (out_features, in_features) in linears.items():
        factor = 16 if ATTENTION.match(name) else 8 if FEED_FORWARD.match(name) else 0
        if factor:
            key = "lycoris_" + name.replace(".", "_")
            tensors[f"{key}.lokr_w1"] = torch.randn(factor, factor, generator=g).bfloat16()
            w2 = (out_features // factor, in_features // factor)
            tensors[f"{key}.lokr_w2"] = torch.randn(*w2, generator=g).bfloat16()
    return tensors


def whole_file(g: torch.Generator) -> None:
    from diffusers import FluxTransformer2DModel

    from flux_lora.lora.convert import convert
    from flux_lora.lora.names import ModuleNames

    with torch.device("meta"):
        model = FluxTransformer2DModel(guidance_embeds=True)
    names = ModuleNames.of(model)
    names.dtype = torch.bfloat16  # as served on a GPU
    tensors = simpletuner_lokr(g, names.linears)
    file_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    started = time.perf_counter()
    converted = convert(tensors, None, names, "bench")
    elapsed = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    held = sum(u.dense.numel() * u.dense.element_size() for u in converted.updates.values()) / 1024**3
    print(
        f"SimpleTuner-default LoKr, {len(converted.updates)} layers, {file_bytes / 1024**2:.0f} MiB in bf16: "
        f"converted in {elapsed:.1f} s to {held:.2f} GiB of dense bf16 updates; peak memory "
        f"{peak:.2f} GiB (was {before:.2f} GiB before)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slot-rank", type=int, default=64)
    parser.add_argument("--whole-file", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; slot rank {args.slot_rank}")
    print(
        "| adapter | layer | exact rank | to an update | rank-"
        + f"{args.slot_rank} relative error | to the slot |"
    )
    print("|---|---|---|---|---|---|")
    for name, ((out, inputs), tensors) in cases(g).items():
        started = time.perf_counter()
        update = update_of(name, tensors, None, "bench")
        converted = time.perf_counter() - started
        assert (update.out_features, update.in_features) == (out, inputs), name
        started = time.perf_counter()
        if update.rank > args.slot_rank:
            _, error = best_of_rank(update, args.slot_rank)
            fitted = f"{time.perf_counter() - started:.2f} s"
            error_text = f"{error:.3f}"
        else:
            fitted, error_text = "copied", "0 (exact)"
        print(
            f"| {name} | {out}x{inputs} | {update.rank} | {converted:.2f} s | {error_text} | {fitted} |",
            flush=True,
        )
    if args.whole_file:
        whole_file(g)


if __name__ == "__main__":
    main()
