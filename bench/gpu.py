"""The go_fast benchmark (issue 4): end to end through `FluxLoraService.predict` (what
`Predictor.run` calls, less cog's input parsing), compiled as in production, each figure the
median of several runs after a warm-up run. Writes the JSON keys the issue names.

    ./scripts/bench-gpu [--runs N] [--out bench/results/<gpu>.json]   # full-size FLUX, CUDA GPU
    ./scripts/bench-gpu --tiny [--out FILE]                            # tiny sizes, CPU, CI-sized

The model is `bench/full_size.py`'s folder of configs: every module at full FLUX.1 size, built by
our own loader on the GPU with random weights (the arithmetic of the trained model). `--tiny`
runs the same code at the tiny model's sizes, 0.25 megapixels and few steps, with the `eager`
compile backend and the quick warm-up: it checks the harness; its figures are not GPU figures.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch

from bench.full_size import write_model_folder
from flux_lora import tiny
from flux_lora.lora import GO_FAST_SCALE, WantedAdapter
from flux_lora.schema import GenerationRequest

PROMPT = "a TOK emoji of a cat"
READY_MARK = "BENCH_READY_S="


def scale(tiny_run: bool) -> dict[str, object]:
    if tiny_run:
        return {"megapixels": "0.25", "dev_steps": 4, "schnell_steps": 2, "runs": 3}
    return {"megapixels": "1", "dev_steps": 28, "schnell_steps": 4, "runs": 5}


def configure(tiny_run: bool, cache_dir: Path, model_dir: Path) -> None:
    os.environ["FLUX_MODEL_DIR"] = str(model_dir)
    os.environ.setdefault("FLUX_LORA_COMPILE", "1")
    os.environ["FLUX_LORA_COMPILE_CACHE"] = str(cache_dir)
    if tiny_run:
        os.environ.setdefault("FLUX_LORA_COMPILE_BACKEND", "eager")
        os.environ.setdefault("FLUX_LORA_WARM_UP", "quick")


def ready_seconds(tiny_run: bool, cache_dir: Path, model_dir: Path) -> float:
    """Process start to setup done, in a fresh interpreter (so nothing is warm but the files)."""
    command = [
        sys.executable,
        "-m",
        "bench.gpu",
        "--ready",
        "--cache",
        str(cache_dir),
        "--model-dir",
        str(model_dir),
    ]
    if tiny_run:
        command.append("--tiny")
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or READY_MARK not in done.stdout:
        raise RuntimeError(f"setup failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def median_seconds(call: Callable[[], object], runs: int) -> float:
    call()  # warm-up: caches, allocator
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, object]:
    from flux_lora.service import FluxLoraService

    settings = scale(args.tiny)
    work = Path(tempfile.mkdtemp(prefix="flux-lora-bench-"))
    model_dir = write_model_folder(work / "model", full=not args.tiny)
    cache_dir = work / "compile-cache"
    ready_cold = ready_seconds(args.tiny, cache_dir, model_dir)  # fills the compile cache
    ready_warm = ready_seconds(args.tiny, cache_dir, model_dir)
    configure(args.tiny, cache_dir, model_dir)
    service = FluxLoraService.setup()
    pipelines = service.pipelines
    runs = args.runs or settings["runs"]
    transformer = pipelines.variant("dev").txt2img.transformer
    lora_files = [work / "rank16.safetensors", work / "rank64.safetensors"]
    for path, (seed, rank) in zip(lora_files, [(1, 16), (2, 64)], strict=True):
        path.write_bytes(tiny.random_lora(seed=seed, rank=rank, transformer=transformer))

    results: dict[str, object] = {"fp8_rel_err": fp8_relative_error(pipelines)}
    results.update(fp8_lora_effect(pipelines, lora_files[0]))

    def predict(**inputs) -> Callable[[], object]:
        request = GenerationRequest(prompt=PROMPT, seed=1, megapixels=settings["megapixels"], **inputs)
        return lambda: service.predict(request)

    dev, schnell = settings["dev_steps"], settings["schnell_steps"]
    results["dev_bf16_s"] = median_seconds(predict(num_inference_steps=dev), runs)
    results["dev_fp8_s"] = median_seconds(predict(num_inference_steps=dev, go_fast=True), runs)
    results["schnell_bf16_s"] = median_seconds(predict(model="schnell", num_inference_steps=schnell), runs)
    results["schnell_fp8_s"] = median_seconds(
        predict(model="schnell", num_inference_steps=schnell, go_fast=True), runs
    )
    results["dev_fp8_4_outputs_s"] = median_seconds(
        predict(num_inference_steps=dev, go_fast=True, num_outputs=4), runs
    )

    # LoRA swaps, rank 16 and 64 alternately: the LoRA stage's own metric, and the compilations.
    loras = [
        "data:application/octet-stream;base64," + base64.b64encode(f.read_bytes()).decode()
        for f in lora_files
    ]
    compilations_before = pipelines.compilations
    swaps = []
    for index in range(2 * runs + 2):
        request = GenerationRequest(
            prompt=PROMPT,
            seed=1,
            megapixels=settings["megapixels"],
            num_inference_steps=1,
            go_fast=True,
            replicate_weights=loras[index % 2],
        )
        swaps.append(service.predict(request).metrics["lora_load_time"])
    results["lora_swap_s"] = statistics.median(swaps[2:])  # the first two also fetch into the cache
    results["recompiles_on_swap"] = pipelines.compilations - compilations_before
    results["ready_cold_s"] = ready_cold
    results["ready_warm_s"] = ready_warm
    results["peak_mem_gib"] = peak_memory_gib(pipelines.device)
    return results


def transformer_inputs(
    transformer: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    *,
    tokens: int = 1024,
    text: int = 512,
    batch: int = 1,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random inputs for one transformer step; by default 1024 image tokens (512x512) and 512
    text tokens (dev's T5 length)."""
    config = transformer.config
    generator = torch.Generator("cpu").manual_seed(seed)

    def random(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    return dict(
        hidden_states=random(batch, tokens, config.in_channels),
        encoder_hidden_states=random(batch, text, config.joint_attention_dim),
        pooled_projections=random(batch, config.pooled_projection_dim),
        timestep=torch.full((batch,), 0.5, device=device, dtype=dtype),
        img_ids=torch.zeros(tokens, 3, device=device, dtype=dtype),
        txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
        guidance=torch.full((batch,), 3.0, device=device, dtype=dtype),
    )


def _step(transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs).sample.float()


def fp8_lora_effect(pipelines, lora_file: Path) -> dict[str, float]:
    """How the fp8 transformer's LoRA effect (output with the LoRA less output without) compares
    with bf16's, at the plain scale and with the schema's 1.5x: the norm ratio, 1.0 is equal."""
    bf16, fp8 = pipelines.lora_slots[("dev", False)], pipelines.lora_slots[("dev", True)]
    inputs = transformer_inputs(bf16.transformer, pipelines.device, pipelines.dtype)
    lora = WantedAdapter("bench", str(lora_file), 1.0, "bench", lora_file.name)
    base_bf16, base_fp8 = _step(bf16.transformer, inputs), _step(fp8.transformer, inputs)
    bf16.activate([lora])
    effect_bf16 = _step(bf16.transformer, inputs) - base_bf16
    figures = {}
    for multiplier, key in ((1.0, "fp8_lora_effect_ratio_x1"), (GO_FAST_SCALE, "fp8_lora_effect_ratio_x1_5")):
        fp8.activate([lora], multiplier)
        figures[key] = float((_step(fp8.transformer, inputs) - base_fp8).norm() / effect_bf16.norm())
    bf16.activate([])
    fp8.activate([])
    return figures


def fp8_relative_error(pipelines) -> float:
    """One transformer step on the same random inputs, fp8 against bf16: |a - b| / |a|."""
    reference = pipelines.variant("dev").txt2img.transformer
    fast = pipelines.variant("dev", fast=True).txt2img.transformer
    inputs = transformer_inputs(reference, pipelines.device, pipelines.dtype)
    a, b = _step(reference, inputs), _step(fast, inputs)
    return float((a - b).norm() / a.norm())


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # resident set, KiB on Linux


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, CI-sized")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per figure (default 5, tiny 3)")
    parser.add_argument("--out", type=Path, help="JSON file to write (default bench/results/<device>.json)")
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ready", action="store_true", help=argparse.SUPPRESS)  # one setup, for ready_*_s
    args = parser.parse_args()
    if args.ready:
        from flux_lora.service import FluxLoraService

        configure(args.tiny, Path(args.cache), args.model_dir)
        started = time.perf_counter()
        FluxLoraService.setup()
        print(f"{READY_MARK}{time.perf_counter() - started:.3f}")
        return
    results = {
        "device": device_name(),
        "date": date.today().isoformat(),
        "command": "./scripts/bench-gpu " + " ".join(sys.argv[1:]),
        **run(args),
    }
    out = args.out or Path("bench/results") / f"{'tiny-cpu' if args.tiny else _slug(results['device'])}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:>22}: {value:.4g}" if isinstance(value, float) else f"{key:>22}: {value}")
    print(f"written to {out}")


def _slug(name: str) -> str:
    for short in ("h100", "h200", "a100", "l40s"):
        if short in name.lower():
            return short
    return name.lower().replace(" ", "-")


if __name__ == "__main__":
    main()
