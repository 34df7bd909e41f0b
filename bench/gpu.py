"""The GPU benchmark: phases in processes of their own, each under its own time bound and all
within one budget, every figure printed and saved the moment it exists, so a run cut short still
returns everything it measured. Sized to fit one call on a lent GPU.

    ./scripts/bench-gpu [--budget 480] [--runs 3] [--out FILE]    # full-size FLUX on a CUDA GPU
    ./scripts/bench-gpu --wheels DIR [...]                         # where torch is there but not our stack
    ./scripts/bench-gpu --tiny [...]                               # the harness at CI size, on the CPU

The phases (`bench/gpu_phases.py` says what each measures), in this order:
- eager: setup without compilation; the bare diffusers `FluxPipeline` call on our loaded modules
  beside the same request through our service (the peer ratio of every figure); go_fast eager;
  one transformer's move off the GPU and back (what an 80 GB GPU pays).
- disk: read and hash speed of this machine's disk: what loading the real weights adds.
- cold: setup compiled with an empty compile cache, then every serving figure.
- warm: setup again on the cache the cold phase filled.

The model is `flux_lora/testing/full_size.py`'s folder of configs: every module at full FLUX.1 size, built by
our own loader on the GPU with random weights (the arithmetic, hence the time, of the trained
model). `--tiny` runs the same code at the tiny model's sizes with the `eager` compile backend.
Results: `bench/results/<gpu>.json` (`tiny-cpu.json`), rewritten after every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

FIGURE_MARK = "BENCH_FIGURE "
# Each phase's own bound in seconds (full size; --tiny: TINY_BOUND each); the budget cuts further.
PHASE_BOUNDS = {"eager": 150, "disk": 40, "cold": 360, "warm": 120}
TINY_BOUND = 300
MIN_PHASE_S = 20  # a phase that would get less than this (or than its bound) is skipped
# Figures of FLUX.1 [dev] 1024x1024, 28 steps, that get a ratio to the bare diffusers call.
PEER = "bare_dev_s"
PEERED = ("dev_bf16_eager_s", "dev_fp8_eager_s", "dev_bf16_s", "dev_fp8_s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU, CI-sized")
    parser.add_argument("--budget", type=float, default=480, help="seconds for all phases together (480)")
    parser.add_argument(
        "--runs", type=int, default=0, help="timed runs per figure after a warm-up (3; tiny 1)"
    )
    parser.add_argument("--phases", default=",".join(PHASE_BOUNDS), help="comma-separated, in order")
    parser.add_argument("--out", type=Path, help="JSON file (default bench/results/<gpu>.json)")
    parser.add_argument("--logs", type=Path, help="folder for each phase's log (default: the work folder)")
    parser.add_argument(
        "--phase-bound", type=float, help="every phase's bound in seconds (default: each its own)"
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit 1 unless every phase is done (rehearsals; a GPU run keeps what it measured)",
    )
    args = parser.parse_args()
    started = time.monotonic()

    import torch

    from flux_lora.testing.full_size import write_model_folder

    device = _device_name(torch)
    out = args.out or Path("bench/results") / f"{'tiny-cpu' if args.tiny else _slug(device)}.json"
    results: dict[str, object] = {
        "device": device,
        "date": date.today().isoformat(),
        "command": "./scripts/bench-gpu " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "budget_s": args.budget,
        "phases": {},
    }
    work = Path(tempfile.mkdtemp(prefix="flux-lora-bench-"))
    model_dir = write_model_folder(work / "model", full=not args.tiny)
    logs = args.logs or work
    logs.mkdir(parents=True, exist_ok=True)
    _save(results, out)
    for phase in [name.strip() for name in args.phases.split(",") if name.strip()]:
        if phase not in PHASE_BOUNDS:
            parser.error(f"--phases: {phase!r} is not one of {', '.join(PHASE_BOUNDS)}")
        left = args.budget - (time.monotonic() - started)
        own = args.phase_bound or (TINY_BOUND if args.tiny else PHASE_BOUNDS[phase])
        bound = min(own, left)
        if left < min(MIN_PHASE_S, own):
            results["phases"][phase] = {"status": f"skipped: {left:.0f} s of the budget left"}
            _say(f"{phase}: skipped, {left:.0f} s of the budget left")
            _save(results, out)
            continue
        command = [
            sys.executable,
            "-m",
            "bench.gpu_phases",
            phase,
            "--work",
            str(work),
            "--model-dir",
            str(model_dir),
        ]
        command += ["--runs", str(args.runs or (1 if args.tiny else 2)), "--spawned-at", repr(time.time())]
        command += ["--tiny"] if args.tiny else []
        _say(f"{phase}: started, bound {bound:.0f} s")
        phase_started = time.monotonic()
        status = _run_phase(command, bound, logs / f"{phase}.log", results, out)
        results["phases"][phase] = {"status": status, "seconds": round(time.monotonic() - phase_started, 1)}
        _say(f"{phase}: {status} in {time.monotonic() - phase_started:.1f} s (log {logs / phase}.log)")
        _save(results, out)
    results["total_s"] = round(time.monotonic() - started, 1)
    _save(results, out)
    _say(f"written to {out}")
    not_done = {
        name: state["status"] for name, state in results["phases"].items() if state["status"] != "done"
    }
    if args.strict and not_done:
        sys.exit(f"bench-gpu --strict: phases not done: {not_done} (logs in {logs})")


def _run_phase(command: list[str], bound: float, log_path: Path, results: dict, out: Path) -> str:
    """Runs one phase, taking in each figure as it is printed; kills the phase at `bound`."""
    deadline = time.monotonic() + bound
    with log_path.open("w") as log:
        child = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True, bufsize=1
        )
        lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=_pump, args=(child.stdout, lines), daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
                return f"cut at its bound of {bound:.0f} s"
            if line is None:
                break
            if line.startswith(FIGURE_MARK):
                figure = json.loads(line[len(FIGURE_MARK) :])
                _take(results, figure["name"], figure["value"])
                _save(results, out)
            else:
                print(line, end="", flush=True)
        code = child.wait()
    if code != 0:
        tail = log_path.read_text().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr, flush=True)
        return f"failed (exit {code})"
    return "done"


def _take(results: dict, name: str, value: object) -> None:
    results[name] = value
    _say(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    peer = results.get(PEER)
    for key in PEERED:
        if isinstance(peer, float) and isinstance(results.get(key), float):
            ratio = round(results[key] / peer, 3)
            if results.get(f"{key}_vs_bare") != ratio:
                results[f"{key}_vs_bare"] = ratio
                _say(f"{key}_vs_bare: {ratio}")


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _save(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")
    partial.write_text(json.dumps(results, indent=2) + "\n")
    partial.replace(out)


def _say(text: str) -> None:
    print(f"[bench] {text}", flush=True)


def _device_name(torch) -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def _slug(name: str) -> str:
    for short in ("h100", "h200", "a100", "l40s"):
        if short in name.lower():
            return short
    return name.lower().replace(" ", "-")


if __name__ == "__main__":
    main()
