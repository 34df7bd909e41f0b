"""What each phase of the GPU benchmark measures (`bench/gpu.py` runs them, one process each).

Every figure is printed the moment it exists, as a `BENCH_FIGURE {json}` line that the runner
saves at once. Timings are end to end through `FluxLoraService.predict` (what `Predictor.run`
calls, less cog's input parsing), each the median of `--runs` runs after one warm-up run. Sizes:
FLUX.1 [dev] 1024x1024 at 28 steps, schnell 4 steps (`--tiny`: 512x512, 4 and 2 steps).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TypeVar

import torch

from bench.gpu import FIGURE_MARK
from flux_lora.device.quant import transformer_inputs

PROMPT = "a TOK emoji of a cat"
T = TypeVar("T")
DISK_TEST_BYTES = {"full": 4 * 1024**3, "tiny": 64 * 1024**2}


def figure(name: str, value: T) -> T:
    print(FIGURE_MARK + json.dumps({"name": name, "value": value}), flush=True)
    return value


def median_seconds(call: Callable[[], object], runs: int) -> float:
    call()  # warm-up: caches, allocator, a first fp8 copy
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        _synchronize()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times), 4)


class Bench:
    """One phase's settings and the service it measures."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tiny = args.tiny
        self.work = Path(args.work)
        self.megapixels = "0.25" if self.tiny else "1"
        self.dev_steps, self.schnell_steps = (4, 2) if self.tiny else (28, 4)
        self.runs = args.runs
        os.environ["FLUX_MODEL_DIR"] = str(args.model_dir)
        os.environ["FLUX_LORA_CACHE_DIR"] = str(self.work / "lora-cache")
        os.environ["FLUX_LORA_COMPILE_CACHE"] = str(self.work / "compile-cache")
        os.environ["FLUX_LORA_ALLOW_PRIVATE_URLS"] = "1"  # the LoRAs come from a loopback server
        if self.tiny:
            os.environ.setdefault("FLUX_LORA_COMPILE_BACKEND", "eager")
            os.environ.setdefault("FLUX_LORA_WARM_UP", "quick")
        self.service = None

    def setup(self, compile_: bool, ready_name: str):
        os.environ["FLUX_LORA_COMPILE"] = "1" if compile_ else "0"
        from flux_lora.service import FluxLoraService

        self.service = FluxLoraService.setup()
        figure(ready_name, round(time.time() - self.args.spawned_at, 2))  # from the process's start
        return self.service

    def request(self, **inputs):
        from flux_lora.schema import GenerationRequest

        inputs = {"num_inference_steps": self.dev_steps, **inputs}
        return GenerationRequest(prompt=PROMPT, seed=1, megapixels=self.megapixels, **inputs)

    def timed(self, name: str, **inputs) -> float:
        request = self.request(**inputs)
        seconds = median_seconds(lambda: self.service.predict(request), self.runs)
        figure(name, seconds)
        return seconds

    def check_dtypes(self, name: str) -> None:
        from flux_lora.device import inventory

        report = inventory.report(self.service)
        figure(f"{name}_faults", report["faults"])
        figure(
            f"{name}_modules", {m["name"]: [m["device"], m["dtypes"], m["bytes"]] for m in report["modules"]}
        )

    def peak_memory(self, name: str) -> None:
        if torch.cuda.is_available():
            figure(name, round(torch.cuda.max_memory_allocated() / 1024**3, 2))
        else:  # resident set, KiB on Linux
            figure(name, round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2))


def phase_eager(bench: Bench) -> None:
    from diffusers import FluxPipeline

    service = bench.setup(compile_=False, ready_name="ready_eager_s")
    bench.check_dtypes("eager")
    pipelines = service.pipelines
    bare = FluxPipeline(**pipelines.variant("dev").txt2img.components)
    bare.set_progress_bar_config(disable=True)
    size = 512 if bench.tiny else 1024

    images = []  # the last bare call's, for the overhead figures (a call more is 5 s on an H200)

    def bare_call():
        with torch.inference_mode():
            images[:] = bare(
                PROMPT,
                width=size,
                height=size,
                num_inference_steps=bench.dev_steps,
                guidance_scale=3.0,
                generator=torch.Generator("cpu").manual_seed(1),
            ).images

    bare_s = figure("bare_dev_s", median_seconds(bare_call, bench.runs))
    ours_s = bench.timed("dev_bf16_eager_s")
    overhead_figures(bench, images, ours_s - bare_s)
    started = time.perf_counter()
    pipelines.variant("dev", fast=True)
    figure("fp8_copy_s", round(time.perf_counter() - started, 2))
    figure("fp8_mode", pipelines.fast_modes["dev"])
    bench.timed("dev_fp8_eager_s", go_fast=True)
    figure("fp8_rel_err", fp8_relative_error(pipelines))
    bench.timed("schnell_fp8_eager_s", model="schnell", num_inference_steps=bench.schnell_steps, go_fast=True)
    move_figures(pipelines)
    bench.check_dtypes("eager_after")
    bench.peak_memory("peak_mem_eager_gib")


def overhead_figures(bench: Bench, images: list, overhead_s: float) -> None:
    """Where our request's time beyond the bare call's goes: the safety check and the webp file
    (quality 80, the default) of the bare call's image, and what is left. Random weights draw
    noise, webp's slowest input: on the CPU a 1024x1024 noise image took 2.3 times as long as a
    smoother one."""
    from flux_lora.output import save_images

    safety_s = figure(
        "safety_check_s", median_seconds(lambda: bench.service.safety.unsafe_indices(images), bench.runs)
    )
    folder = Path(tempfile.mkdtemp(dir=bench.work))
    save_s = figure(
        "save_webp_s", median_seconds(lambda: save_images(images, folder, "webp", 80), bench.runs)
    )
    figure("webp_kb", round((folder / "out-0.webp").stat().st_size / 1024))
    figure("overhead_rest_s", round(overhead_s - safety_s - save_s, 4))


def move_figures(pipelines) -> None:
    """schnell's bf16 transformer off the GPU and back twice, as an 80 GB GPU would move it; one
    step before and after must be identical."""
    residency, key = pipelines.residency, ("schnell", False)
    transformer = pipelines.variant("schnell").txt2img.transformer
    inputs = transformer_inputs(transformer, pipelines.device, pipelines.dtype)
    before = _step(transformer, inputs)
    first = len(residency.moves)
    for _ in range(2):
        residency.evict(key)
        residency.ensure(key)
    names = ["move_off_first_s", "move_on_s", "move_off_s", "move_on_again_s"]
    for name, (_, _, seconds) in zip(names, residency.moves[first:], strict=True):
        figure(name, round(seconds, 3))
    figure("move_gib", round(residency.sizes[key] / 1024**3, 2))
    figure("move_roundtrip_identical", bool(torch.equal(before, _step(transformer, inputs))))


def phase_disk(bench: Bench) -> None:
    """Sequential read speed of a file written here (the page cache dropped first where this
    process may), and SHA-256 speed: the two costs of loading real weights that random ones skip."""
    size = DISK_TEST_BYTES["tiny" if bench.tiny else "full"]
    path = bench.work / "disk-test.bin"
    block = os.urandom(64 * 1024**2)
    with path.open("wb") as handle:
        for _ in range(size // len(block)):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
    figure("disk_cache_dropped", _drop_page_cache(path, everything=not bench.tiny))
    started = time.perf_counter()
    with path.open("rb", buffering=0) as handle:
        while handle.read(16 * 1024**2):
            pass
    figure("disk_read_gbps", round(size / (time.perf_counter() - started) / 1e9, 2))
    started = time.perf_counter()
    digest = hashlib.sha256()
    for _ in range(size // len(block)):
        digest.update(block)
    figure("sha256_gbps", round(size / (time.perf_counter() - started) / 1e9, 2))
    path.unlink()


def phase_cold(bench: Bench) -> None:
    service = bench.setup(compile_=True, ready_name="ready_cold_s")
    pipelines = service.pipelines
    figure("setup_compilations", pipelines.compilations)
    bench.check_dtypes("compiled")
    after_setup = pipelines.compilations
    bench.timed("dev_fp8_s", go_fast=True)
    bench.timed("dev_bf16_s")
    bench.timed("schnell_fp8_s", model="schnell", num_inference_steps=bench.schnell_steps, go_fast=True)
    bench.timed("schnell_bf16_s", model="schnell", num_inference_steps=bench.schnell_steps)
    figure("request_compilations", pipelines.compilations - after_setup)
    lora_figures(bench)
    bench.peak_memory("peak_mem_gib")
    bench.runs = max(1, bench.runs // 2)
    bench.timed("dev_fp8_4_outputs_s", go_fast=True, num_outputs=4)
    bench.peak_memory("peak_mem_4_outputs_gib")
    exercise_every_path(bench)


def exercise_every_path(bench: Bench) -> None:
    """`inspect --exercise`'s requests, then the dtype check of every module."""
    from flux_lora.dev import exercise

    started, compilations = time.perf_counter(), bench.service.pipelines.compilations
    exercise.run(bench.service)
    figure("exercise_s", round(time.perf_counter() - started, 2))
    figure("exercise_compilations", bench.service.pipelines.compilations - compilations)
    bench.check_dtypes("exercised")


def lora_figures(bench: Bench) -> None:
    """Rank 16 and 64 LoRAs (bf16, every attention and projection layer), served over loopback
    HTTP through the real download and cache: swap times, recompilations, and the fp8 effect."""
    from flux_lora.testing import tiny

    pipelines = bench.service.pipelines
    transformer = pipelines.variant("dev").txt2img.transformer
    files = []
    for seed, rank in ((1, 16), (2, 64)):
        path = bench.work / f"rank{rank}.safetensors"
        path.write_bytes(
            tiny.random_lora(seed=seed, rank=rank, transformer=transformer, dtype=torch.bfloat16)
        )
        files.append(path)
    figure("lora_file_mb", [round(f.stat().st_size / 1e6, 1) for f in files])
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(bench.work)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urls = [f"http://127.0.0.1:{server.server_port}/{f.name}" for f in files]
    compilations = pipelines.compilations
    swaps = []
    for index in range(2 * bench.runs + 2):
        request = bench.request(num_inference_steps=1, go_fast=True, replicate_weights=urls[index % 2])
        swaps.append(bench.service.predict(request).metrics["lora_load_time"])
    figure("lora_first_fetch_s", [round(s, 3) for s in swaps[:2]])
    figure("lora_swap_s", round(statistics.median(swaps[2:]), 4))  # the first two also download
    figure("recompiles_on_swap", pipelines.compilations - compilations)
    bench.timed("dev_fp8_lora_s", go_fast=True, replicate_weights=urls[0])
    lokr_figures(bench, server, transformer)
    server.shutdown()
    fp8_lora_effect(pipelines, files[0])


def lokr_figures(bench: Bench, server: ThreadingHTTPServer, transformer: torch.nn.Module) -> None:
    """A SimpleTuner-default LyCORIS LoKr (whole factors: dense updates on 342 layers) through the
    compiled server: loaded into bf16 weights exactly, and into the fp8 copy's slots at their rank
    (truncated SVD). Load times and recompilations."""
    from safetensors.torch import save_file

    from bench.lora_ranks import simpletuner_lokr
    from flux_lora.lora.names import linear_layers

    path = bench.work / "lokr.safetensors"
    save_file(simpletuner_lokr(torch.Generator().manual_seed(3), linear_layers(transformer)), path)
    url = f"http://127.0.0.1:{server.server_port}/{path.name}"
    compilations = bench.service.pipelines.compilations
    for go_fast, name in ((False, "lokr_bf16_load_s"), (True, "lokr_fp8_load_s")):
        request = bench.request(num_inference_steps=1, go_fast=go_fast, replicate_weights=url)
        figure(name, round(bench.service.predict(request).metrics["lora_load_time"], 3))
    figure("recompiles_on_lokr", bench.service.pipelines.compilations - compilations)


def fp8_lora_effect(pipelines, lora_file: Path) -> None:
    """How the fp8 transformer's LoRA effect (output with the LoRA less output without) compares
    with bf16's, at the plain scale and with the schema's 1.5x: the norm ratio, 1.0 is equal."""
    from flux_lora.lora.adapters import GO_FAST_SCALE, WantedAdapter

    slots_bf16, slots_fp8 = pipelines.lora_slots[("dev", False)], pipelines.lora_slots[("dev", True)]
    slots_bf16.activate([])
    slots_fp8.activate([])
    inputs = transformer_inputs(slots_bf16.transformer, pipelines.device, pipelines.dtype)
    lora = WantedAdapter("bench", str(lora_file), 1.0, "bench", lora_file.name)
    base_bf16, base_fp8 = _step(slots_bf16.transformer, inputs), _step(slots_fp8.transformer, inputs)
    slots_bf16.activate([lora])
    effect_bf16 = _step(slots_bf16.transformer, inputs) - base_bf16
    for multiplier, name in (
        (1.0, "fp8_lora_effect_ratio_x1"),
        (GO_FAST_SCALE, "fp8_lora_effect_ratio_x1_5"),
    ):
        slots_fp8.activate([lora], multiplier)
        effect = _step(slots_fp8.transformer, inputs) - base_fp8
        figure(name, round(float(effect.norm() / effect_bf16.norm()), 3))
    slots_bf16.activate([])
    slots_fp8.activate([])


def phase_warm(bench: Bench) -> None:
    service = bench.setup(compile_=True, ready_name="ready_warm_s")
    after_setup = service.pipelines.compilations
    started = time.perf_counter()
    service.predict(bench.request(go_fast=True))
    figure("warm_first_dev_fp8_s", round(time.perf_counter() - started, 3))
    figure("warm_request_compilations", service.pipelines.compilations - after_setup)


def fp8_relative_error(pipelines) -> float:
    """One transformer step on the same random inputs, fp8 against bf16: |a - b| / |a|."""
    reference = pipelines.variant("dev").txt2img.transformer
    fast = pipelines.variant("dev", fast=True).txt2img.transformer
    inputs = transformer_inputs(reference, pipelines.device, pipelines.dtype)
    a, b = _step(reference, inputs), _step(fast, inputs)
    return round(float((a - b).norm() / a.norm()), 4)


def _step(transformer: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.inference_mode():
        return transformer(**inputs).sample.float()


def _drop_page_cache(path: Path, everything: bool) -> str:
    """The whole page cache on the bench machine when allowed (root); never on a shared one."""
    if everything:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "all (drop_caches)"
        except OSError:
            pass
    with path.open("rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return "this file (fadvise)"


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # the bench's output is its figures
        pass


PHASES = {"eager": phase_eager, "disk": phase_disk, "cold": phase_cold, "warm": phase_warm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("phase", choices=PHASES)
    parser.add_argument("--work", required=True)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--spawned-at", type=float, required=True)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    PHASES[args.phase](Bench(args))


if __name__ == "__main__":
    main()
