"""CPU benchmark on the tiny model: a bare diffusers call against the same request end to end
through the real Cog server over HTTP. Prints both medians and their ratio.

    ./scripts/bench [--runs N] [--size 256] [--steps 4] [--format webp]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
from flux_lora.models import layout
from flux_lora.testing import tiny

PROMPT = "a TOK emoji of a cat"


def bare_pipeline_call(model_dir: Path, size: int, steps: int) -> Callable[[], None]:
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model_dir / "FLUX.1-dev", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)

    def call() -> None:
        with torch.inference_mode():
            pipe(
                prompt=PROMPT,
                width=size,
                height=size,
                num_inference_steps=steps,
                guidance_scale=3.0,
                generator=torch.Generator("cpu").manual_seed(1),
            )

    return call


def http_call(
    server: CogServer, size: int, steps: int, output_format: str, predict_times: list[float]
) -> Callable[[], None]:
    inputs = {
        "output_format": output_format,
        "prompt": PROMPT,
        "aspect_ratio": "custom",
        "width": size,
        "height": size,
        "num_inference_steps": steps,
        "seed": 1,
        "disable_safety_checker": True,
    }

    def call() -> None:
        status, body = server.predict(inputs)
        assert status == 200 and body["status"] == "succeeded", body
        predict_times.append(body["metrics"]["predict_time"])

    return call


def lora_timings(server: CogServer, runs: int) -> dict[str, float]:
    """Medians of coglet-reported `lora_load_time` (ms): loading a cached LoRA onto the bare
    transformer, swapping between two cached LoRAs, and repeating an unchanged one."""
    loras = [bytes_to_data_uri(tiny.random_lora(seed=seed)) for seed in (1, 2)]
    inputs = {"prompt": PROMPT, "num_inference_steps": 1, "megapixels": "0.25", "seed": 1}

    def load_time(**lora: str) -> float:
        status, body = server.predict({**inputs, **lora})
        assert status == 200 and body["status"] == "succeeded", body
        return body["metrics"].get("lora_load_time", 0.0) * 1e3

    for lora in loras:  # first use: decoded into the cache
        load_time(replicate_weights=lora)
    from_cache, swap, unchanged = [], [], []
    for _ in range(runs):
        load_time()  # no LoRA: adapters unloaded
        from_cache.append(load_time(replicate_weights=loras[0]))
        swap.append(load_time(replicate_weights=loras[1]))
        unchanged.append(load_time(replicate_weights=loras[1]))
    return {
        "load from cache": statistics.median(from_cache),
        "swap between two": statistics.median(swap),
        "unchanged (no reload)": statistics.median(unchanged),
    }


def interleaved(calls: dict[str, Callable[[], None]], runs: int, warmup: int = 3) -> dict[str, list[float]]:
    """Time the calls turn by turn, so drift on a shared machine hits each alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            started = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--format", default="webp", choices=["webp", "jpg", "png"])
    args = parser.parse_args()
    model_dir = tiny.build(layout.TINY_MODEL_DIR)
    predict_times: list[float] = []
    with CogServer(env={"FLUX_MODEL_DIR": str(model_dir)}) as server:
        assert server.start()["status"] == "READY"
        times = interleaved(
            {
                "bare": bare_pipeline_call(model_dir, args.size, args.steps),
                "http": http_call(server, args.size, args.steps, args.format, predict_times),
            },
            args.runs,
        )
        lora_ms = lora_timings(server, max(5, args.runs // 3))
    bare_ms, http_ms = (statistics.median(times[name]) * 1e3 for name in ("bare", "http"))
    inside_ms = statistics.median(predict_times[-args.runs :]) * 1e3
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    print(
        f"request: tiny FLUX.1-dev, {args.size}x{args.size}, {args.steps} steps, {args.format}; {args.runs} runs each"
    )
    print(f"bare diffusers call         median {bare_ms:7.1f} ms")
    print(f"end to end over HTTP        median {http_ms:7.1f} ms")
    print(f"  of which run() (coglet's predict_time) {inside_ms:7.1f} ms")
    print(f"ratio {http_ms / bare_ms:.3f} (goal <= 1.10)")
    rank = 4
    for name, ms in lora_ms.items():
        print(f"LoRA (rank {rank}, tiny model) {name:22s} median {ms:6.1f} ms (lora_load_time)")


if __name__ == "__main__":
    main()
