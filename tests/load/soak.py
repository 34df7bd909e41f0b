"""Soak: many sequential predictions through the real Cog server (coglet) on the tiny model,
checking that the worker's resources stay flat.

    ./scripts/soak [--requests N] [--seed S] [--json FILE]

The mix covers every path a request can take: txt2img, img2img and inpaint; no LoRA, LoRA A (an
http:// URL on a loopback file server, so the real downloader runs), LoRA B (a `data:` URL), and
A as the main with B as the extra LoRA; dev and schnell; go_fast on and off (3 x 4 x 2 x 2 = 48
combinations). The warm-up runs each combination once with knobs from the mix, then once more
with the largest knobs of the mix (2 outputs, most steps, every size in turn), so every lazily
built thing exists before the first measurement (the fp8 copies of both transformers, an adapter
set per transformer, both LoRAs in the cache) and the allocators have reached their high-water
mark (after the first round alone, RSS still climbed 50 to 70 MB over the next 50 requests, then
stayed put). Then N requests draw combinations at random (seeded), with varied sizes, steps,
output counts, formats and LoRA scales, and the same figures are taken again.

What is measured, and what "flat" means here (the tolerances and why):
- worker RSS (VmRSS of coglet's worker, the server's child process), and the server's own: end -
  start must be under max(64 MB, 5 % of start). After the warm-up RSS does not trend, but it
  moves in steps of 8 to 31 MB, up and down (the allocators' heaps growing and shrinking with
  the sizes in the mix, we assume; not traced): end - start measured -14 to +21 MB over 100 to
  300 requests and up to +40 MB over 40 (17 runs). An image kept per request (a 512x512 output
  is 0.75 MB as a PIL image, 3 MB as an fp32 tensor) adds 225 MB or more over 300 requests; a
  leak of 220 KB a request crosses 64 MB within 300.
- open file descriptors of the worker (and of the coglet server): end within +-2 of start. A
  pipe or socket may be open at the instant of the sample; a leak is one or more per request.
- adapters registered: the service does not report them, so they are inferred per transformer
  (dev, schnell, and their fp8 copies) from the prediction logs: `LoRA swap: L loaded, U
  unloaded` moves the count by L - U. After every request the transformer it ran on must hold
  exactly the LoRAs it asked for (0, 1 or 2) and the total never exceeds 8 (2 on each of 4).
- the LoRA cache on disk (FLUX_LORA_CACHE_DIR, a temporary folder): bytes and number of files
  identical to the warm-up's (each LoRA enters it on first use and never again).
- no fp8 copy of a transformer is made after the warm-up; no request fails; no 5xx; the server
  is READY at the end.

Exits 1 when a check fails. Measured on this 2-core CPU machine, idle: `./scripts/soak` (300
requests) 49 s end to end (server start 5 s, warm-up of 96 13 s, the 300 predictions 29 s, about
95 ms each); `--requests 40` 25 s. While other processes share the two cores it is several times
slower (216 and 235 s measured for 300, with the same request taking 0.07 s or 6 s inside the
worker by turns; the cause was not looked into).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODES = ("txt2img", "img2img", "inpaint")
LORAS = ("none", "A", "B", "A+B")
MODELS = ("dev", "schnell")
GO_FAST = (False, True)
PROMPTS = ("a TOK emoji of a cat", "a red circle", "a small blue dog on a white background", "a star")
ASPECTS = ("1:1", "16:9", "2:3", "21:9", "4:5")
SIZES = ((256, 256), (320, 240), (240, 336), (384, 256))  # img2img / inpaint input images
FORMATS = ("webp", "jpg", "png")

# Tolerances: see the module docstring.
RSS_TOLERANCE_BYTES = 64 * 2**20
RSS_TOLERANCE_FRACTION = 0.05
FD_TOLERANCE = 2
MAX_ADAPTERS = 2 * len(MODELS) * len(GO_FAST)
SAMPLE_EVERY = 25  # worker RSS is also sampled every this many requests, for the trajectory

SWAP_RE = re.compile(r"LoRA swap: (\d+) loaded, (\d+) unloaded")
FP8_COPY_RE = re.compile(r"go_fast: \S+ transformer copied")


@dataclass(frozen=True)
class Combo:
    mode: str
    lora: str
    model: str
    go_fast: bool

    @property
    def label(self) -> str:
        return f"{self.mode}/{self.model}/{'fast' if self.go_fast else 'base'}/{self.lora}"

    @property
    def transformer(self) -> tuple[str, bool]:
        """Which transformer runs it: go_fast runs the fp8 copy (the mix has no custom sizes,
        the one case where go_fast stays on the base transformer)."""
        return (self.model, self.go_fast)

    @property
    def lora_count(self) -> int:
        return {"none": 0, "A": 1, "B": 1, "A+B": 2}[self.lora]


def all_combos() -> list[Combo]:
    return [
        Combo(mode, lora, model, fast)
        for mode in MODES
        for lora in LORAS
        for model in MODELS
        for fast in GO_FAST
    ]


# The worker process, seen from outside.


def child_pids(pid: int) -> list[int]:
    """Processes whose parent is `pid` (what `pgrep -P pid` lists), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent pid; field 2, the command, may hold spaces: split after its ')'.
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            children.append(int(entry))
    return sorted(children)


def worker_pid(server_pid: int, timeout: float = 10) -> int:
    """coglet's worker: the one child of the server process (`python -c ... _run_worker()`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = child_pids(server_pid)
        if len(children) == 1:
            return children[0]
        time.sleep(0.1)
    raise RuntimeError(
        f"coglet server {server_pid} has children {child_pids(server_pid)}, expected one worker"
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def folder_size(root: Path) -> tuple[int, int]:
    """(bytes, files) under `root`, every file, hidden ones (locks, staging) included."""
    total = files = 0
    for folder, _, names in os.walk(root):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except FileNotFoundError:
                continue
            files += 1
    return total, files


class AdapterLedger:
    """Adapters registered on each transformer, inferred from the prediction logs."""

    def __init__(self) -> None:
        self.count: dict[tuple[str, bool], int] = {}
        self.fp8_copies = 0
        self.peak = 0  # the most adapters registered at once, all transformers together

    def update(self, combo: Combo, logs: str, succeeded: bool) -> str | None:
        """Account for one prediction's logs; returns what is wrong, or None."""
        key = combo.transformer
        for loaded, unloaded in SWAP_RE.findall(logs):
            self.count[key] = self.count.get(key, 0) + int(loaded) - int(unloaded)
        self.fp8_copies += len(FP8_COPY_RE.findall(logs))
        self.peak = max(self.peak, self.total)
        if not succeeded:  # a failed request may stop before its LoRAs: nothing to expect
            return None
        have = self.count.get(key, 0)
        if have != combo.lora_count:
            return (
                f"{combo.label}: {have} adapter(s) inferred on its transformer, expected {combo.lora_count}"
            )
        if self.total > MAX_ADAPTERS:
            return f"{combo.label}: {self.total} adapters in all, more than {MAX_ADAPTERS}"
        return None

    @property
    def total(self) -> int:
        return sum(self.count.values())


@dataclass
class Snapshot:
    requests: int
    worker_rss: int
    worker_fds: int
    worker_threads: int
    server_rss: int
    server_fds: int
    adapters: int
    fp8_copies: int
    cache_bytes: int
    cache_files: int


@dataclass
class Result:
    combo: Combo
    http_status: int
    status: str  # the prediction's, or "http <code>"
    seconds: float
    predict_time: float | None
    retries_409: int
    error: str | None = None
    rss_after: int = 0  # worker RSS right after the response


@dataclass
class SoakReport:
    requests: int
    warmup: int
    start: Snapshot
    end: Snapshot
    wall_s: float
    results: list[Result] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    final_health: str = ""
    rss_samples: list[tuple[int, int]] = field(default_factory=list)  # (requests served, worker RSS)
    adapters_peak: int = 0

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.results if r.status != "succeeded"]

    @property
    def flat(self) -> bool:
        return not self.problems


# Requests.


def image_data_uri(size: tuple[int, int], color: tuple[int, int, int], mask: bool = False) -> str:
    from PIL import Image

    if mask:
        image = Image.new("L", size, 0)
        image.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    else:
        image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class InputMaker:
    """Inputs for a combination: fixed images and LoRA references, varied knobs."""

    def __init__(self, lora_a: str, lora_b: str):
        self.lora_a, self.lora_b = lora_a, lora_b
        self.images = {size: image_data_uri(size, (40 + size[0] % 200, 90, 160)) for size in SIZES}
        self.masks = {size: image_data_uri(size, (0, 0, 0), mask=True) for size in SIZES}

    def inputs(self, combo: Combo, rng: random.Random, index: int, largest: bool = False) -> dict[str, Any]:
        """Inputs drawn from the mix; `largest`: the most costly knobs of the mix (2 outputs, the
        most steps) and every size and format in turn, for the warm-up."""
        inputs: dict[str, Any] = {
            "prompt": rng.choice(PROMPTS),
            "model": combo.model,
            "go_fast": combo.go_fast,
            "seed": index,
            "num_inference_steps": 2 if largest else rng.choice((1, 2)),  # image modes: below
            "num_outputs": 2 if largest else rng.choice((1, 1, 1, 2)),
            "output_format": FORMATS[index % len(FORMATS)] if largest else rng.choice(FORMATS),
            "megapixels": "0.25",
        }
        if combo.mode == "txt2img":
            inputs["aspect_ratio"] = ASPECTS[index % len(ASPECTS)] if largest else rng.choice(ASPECTS)
        else:
            size = SIZES[index % len(SIZES)] if largest else rng.choice(SIZES)
            inputs["image"] = self.images[size]
            # At least one denoising step must remain: steps x strength >= 1.
            inputs["num_inference_steps"] = 3 if largest else rng.choice((2, 3))
            inputs["prompt_strength"] = rng.choice((0.6, 0.8, 1.0))
            if combo.mode == "inpaint":
                inputs["mask"] = self.masks[size]
        if combo.lora in ("A", "A+B"):
            inputs["replicate_weights"] = self.lora_a
            inputs["lora_scale"] = rng.choice((0.5, 1.0))
        if combo.lora == "B":
            inputs["replicate_weights"] = self.lora_b
            inputs["lora_scale"] = rng.choice((0.5, 1.0))
        if combo.lora == "A+B":
            inputs["extra_lora"] = self.lora_b
            inputs["extra_lora_scale"] = rng.choice((0.25, 0.75))
        return inputs


def post_prediction(url: str, inputs: dict[str, Any], timeout: float = 300) -> tuple[int, dict, int]:
    """POST /predictions (sync); (status, body, 409s retried). coglet now and then answers 409
    between back-to-back requests (see DESIGN.md): retried up to 3 times, and counted."""
    request = urllib.request.Request(
        url + "/predictions",
        data=json.dumps({"input": inputs}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    for retries in range(4):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return response.status, json.load(response), retries
        except urllib.error.HTTPError as err:
            raw = err.read()
            if err.code == 409 and retries < 3:
                time.sleep(0.1)
                continue
            try:
                body = json.loads(raw)
            except json.JSONDecodeError:
                body = {"detail": raw.decode(errors="replace")}
            return err.code, body, retries
    raise AssertionError("unreachable")


# The soak.


class Soak:
    """One server, its LoRA sources and cache, and the bookkeeping of a soak."""

    def __init__(self, url: str, server_pid: int, cache_dir: Path, lora_a: str, lora_b: str, seed: int = 0):
        self.url = url
        self.server_pid = server_pid
        self.worker = worker_pid(server_pid)
        self.cache_dir = cache_dir
        self.maker = InputMaker(lora_a, lora_b)
        self.rng = random.Random(seed)
        self.ledger = AdapterLedger()
        self.results: list[Result] = []
        self.problems: list[str] = []
        self.served = 0

    def run_one(self, combo: Combo, largest: bool = False) -> Result:
        inputs = self.maker.inputs(combo, self.rng, self.served, largest)
        started = time.perf_counter()
        status, body, retries = post_prediction(self.url, inputs)
        seconds = time.perf_counter() - started
        self.served += 1
        if status == 200:
            state = body.get("status", "?")
            problem = self.ledger.update(combo, body.get("logs") or "", state == "succeeded")
            if problem:
                self.problems.append(f"request {self.served}: {problem}")
        else:
            state = f"http {status}"
        error = None if state == "succeeded" else str(body.get("error") or body.get("detail") or body)[:300]
        result = Result(
            combo, status, state, seconds, (body.get("metrics") or {}).get("predict_time"), retries, error
        )
        result.rss_after = rss_bytes(self.worker)
        if status >= 500:
            self.problems.append(f"request {self.served}: {combo.label}: HTTP {status}: {error}")
        self.results.append(result)
        return result

    def snapshot(self) -> Snapshot:
        cache_bytes, cache_files = folder_size(self.cache_dir)
        return Snapshot(
            requests=self.served,
            worker_rss=rss_bytes(self.worker),
            worker_fds=fd_count(self.worker),
            worker_threads=thread_count(self.worker),
            server_rss=rss_bytes(self.server_pid),
            server_fds=fd_count(self.server_pid),
            adapters=self.ledger.total,
            fp8_copies=self.ledger.fp8_copies,
            cache_bytes=cache_bytes,
            cache_files=cache_files,
        )

    def health(self) -> str:
        with urllib.request.urlopen(self.url + "/health-check", timeout=10) as response:
            return json.load(response)["status"]

    def run(self, requests: int, progress: bool = False) -> SoakReport:
        combos = all_combos()
        # Warm-up: every path once with knobs from the mix, then every path once with the
        # largest knobs of the mix, so the allocators reach their high-water mark before the
        # start figures (after the first round alone RSS still climbs 50-70 MB in the next 50).
        for combo in combos:
            self.run_one(combo)
        for combo in combos:
            self.run_one(combo, largest=True)
        warmup_results = list(self.results)
        self.results.clear()
        warmup_failures = [r for r in warmup_results if r.status != "succeeded"]
        for r in warmup_failures:
            self.problems.append(f"warm-up {r.combo.label}: {r.status}: {r.error}")
        time.sleep(0.2)  # let the last response's buffers settle before sampling
        start = self.snapshot()
        started = time.perf_counter()
        samples = [(0, start.worker_rss)]
        for index in range(requests):
            result = self.run_one(self.rng.choice(combos))
            if (index + 1) % SAMPLE_EVERY == 0:
                samples.append((index + 1, rss_bytes(self.worker)))
            if progress and (index + 1) % 50 == 0:
                print(
                    f"  {index + 1}/{requests} ({time.perf_counter() - started:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if result.status != "succeeded" and progress:
                print(f"  FAILED {result.combo.label}: {result.status}: {result.error}", file=sys.stderr)
        wall = time.perf_counter() - started
        time.sleep(0.2)
        end = self.snapshot()
        report = SoakReport(
            requests, 2 * len(combos), start, end, wall, list(self.results), list(self.problems)
        )
        report.final_health = self.health()
        report.adapters_peak = self.ledger.peak
        report.rss_samples = [*samples, (requests, end.worker_rss)]
        report.problems.extend(flatness_problems(start, end))
        for r in report.failures:
            report.problems.append(f"{r.combo.label}: {r.status}: {r.error}")
        if report.final_health != "READY":
            report.problems.append(f"health-check says {report.final_health} after the soak")
        return report


def flatness_problems(start: Snapshot, end: Snapshot) -> list[str]:
    problems = []
    rss_limit = max(RSS_TOLERANCE_BYTES, RSS_TOLERANCE_FRACTION * start.worker_rss)
    if end.worker_rss - start.worker_rss > rss_limit:
        problems.append(
            f"worker RSS grew {mb(end.worker_rss - start.worker_rss)} MB "
            f"({mb(start.worker_rss)} -> {mb(end.worker_rss)} MB), more than {mb(rss_limit)} MB"
        )
    server_limit = max(RSS_TOLERANCE_BYTES, RSS_TOLERANCE_FRACTION * start.server_rss)
    if end.server_rss - start.server_rss > server_limit:
        problems.append(
            f"server RSS grew {mb(end.server_rss - start.server_rss)} MB "
            f"({mb(start.server_rss)} -> {mb(end.server_rss)} MB), more than {mb(server_limit)} MB"
        )
    for name in ("worker_fds", "server_fds"):
        before, after = getattr(start, name), getattr(end, name)
        if abs(after - before) > FD_TOLERANCE:
            problems.append(f"{name}: {before} -> {after}, more than +-{FD_TOLERANCE}")
    if (end.cache_bytes, end.cache_files) != (start.cache_bytes, start.cache_files):
        problems.append(
            f"LoRA cache changed after every LoRA was in it: {start.cache_bytes} B in {start.cache_files} "
            f"files -> {end.cache_bytes} B in {end.cache_files} files"
        )
    if end.fp8_copies != start.fp8_copies:
        problems.append(
            f"fp8 transformer copies made after the warm-up: {start.fp8_copies} -> {end.fp8_copies}"
        )
    if end.adapters > MAX_ADAPTERS:
        problems.append(f"{end.adapters} adapters registered, more than {MAX_ADAPTERS}")
    return problems


def mb(value: float) -> str:
    return f"{value / 2**20:.1f}"


def table(report: SoakReport) -> str:
    s, e = report.start, report.end
    rows = [
        ("requests served", f"{report.requests} (+{report.warmup} warm-up)", ""),
        ("failures", str(len(report.failures)), ""),
        ("409s retried", str(sum(r.retries_409 for r in report.results)), ""),
        (
            "wall time",
            f"{report.wall_s:.1f} s",
            f"{report.wall_s / max(report.requests, 1) * 1e3:.0f} ms/request",
        ),
        ("", "start", "end"),
        (
            "worker RSS (MB)",
            mb(s.worker_rss),
            f"{mb(e.worker_rss)} ({(e.worker_rss - s.worker_rss) / 2**20:+.1f})",
        ),
        ("worker open fds", str(s.worker_fds), str(e.worker_fds)),
        ("worker threads", str(s.worker_threads), str(e.worker_threads)),
        (
            "server RSS (MB)",
            mb(s.server_rss),
            f"{mb(e.server_rss)} ({(e.server_rss - s.server_rss) / 2**20:+.1f})",
        ),
        ("server open fds", str(s.server_fds), str(e.server_fds)),
        (
            "adapters registered (from logs)",
            str(s.adapters),
            f"{e.adapters} (never more than {report.adapters_peak})",
        ),
        ("fp8 transformer copies", str(s.fp8_copies), str(e.fp8_copies)),
        (
            "LoRA cache on disk",
            f"{s.cache_bytes} B, {s.cache_files} files",
            f"{e.cache_bytes} B, {e.cache_files} files",
        ),
        ("health-check at the end", "", report.final_health),
    ]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:<24}  {c}" for a, b, c in rows]
    lines.append("")
    lines.append(f"{'median latency (HTTP, ms)':<{width}}  {'requests':<24}  median  (p90)")
    groups: dict[str, list[float]] = {}
    for r in report.results:
        groups.setdefault(r.combo.mode, []).append(r.seconds)
        groups.setdefault(f"  {'go_fast' if r.combo.go_fast else 'base'}", []).append(r.seconds)
        groups.setdefault(f"  {r.combo.model}", []).append(r.seconds)
        groups.setdefault(f"  LoRA {r.combo.lora}", []).append(r.seconds)
    order = [*MODES, *(f"  {m}" for m in MODELS), "  base", "  go_fast", *(f"  LoRA {x}" for x in LORAS)]
    for name in order:
        times = sorted(groups.get(name, []))
        if times:
            p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
            lines.append(
                f"{name:<{width}}  {len(times):<24}  {statistics.median(times) * 1e3:6.0f}  ({p90 * 1e3:.0f})"
            )
    lines.append("")
    trajectory = " ".join(mb(rss) for _, rss in report.rss_samples)
    peak = max((r.rss_after for r in report.results), default=0)
    lines.append(f"worker RSS, highest after any request of the soak: {mb(peak)} MB")
    lines.append(f"worker RSS every {SAMPLE_EVERY} requests (MB): {trajectory}")
    lines.append("flat: yes" if report.flat else "NOT FLAT:\n  " + "\n  ".join(report.problems))
    return "\n".join(lines)


# A server with its LoRA sources.


@contextmanager
def soak_server(folder: Path) -> Iterator[Soak]:
    """The real server on the tiny model with LoRA A on a loopback file server (plain http://, the
    real downloader, FLUX_LORA_ALLOW_PRIVATE_URLS=1) and LoRA B as a data: URL."""
    from flux_lora.dev.cog_server import CogServer, bytes_to_data_uri
    from flux_lora.models import layout
    from flux_lora.testing import tiny
    from tests.fakes import FakeServer

    model_dir = tiny.build(layout.TINY_MODEL_DIR)
    cache_dir = folder / "lora-cache"
    with ExitStack() as stack:
        files = stack.enter_context(FakeServer())
        files.file("/loras/a.safetensors", tiny.random_lora(seed=101))
        lora_b = bytes_to_data_uri(tiny.random_lora(seed=202))
        closed = "http://127.0.0.1:9"  # services a reference might name: a closed port
        env = {
            "FLUX_MODEL_DIR": str(model_dir),
            "FLUX_LORA_CACHE_DIR": str(cache_dir),
            "FLUX_LORA_ALLOW_PRIVATE_URLS": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "FLUX_LORA_REPLICATE_URL": closed,
            "HF_ENDPOINT": closed,
            "FLUX_LORA_CIVITAI_URL": closed,
        }
        server = stack.enter_context(CogServer(env=env, log_path=folder / "coglet.log"))
        health = server.start()
        if health["status"] != "READY":
            raise RuntimeError(f"server not READY: {health['status']}: {health.get('setup', {}).get('logs')}")
        yield Soak(server.url, server.process.pid, cache_dir, f"{files.url}/loras/a.safetensors", lora_b)


def soak(requests: int, seed: int = 0, progress: bool = False, folder: Path | None = None) -> SoakReport:
    with ExitStack() as stack:
        if folder is None:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flux-lora-soak-")))
        s = stack.enter_context(soak_server(folder))
        s.rng.seed(seed)
        return s.run(requests, progress=progress)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=300, help="predictions after the warm-up (default 300)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the request mix (default 0)")
    parser.add_argument("--json", type=Path, help="also write the report as JSON to this file")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    report = soak(args.requests, seed=args.seed, progress=True)
    total = time.perf_counter() - began
    print(table(report))
    print(f"total run time (server start, warm-up, soak): {total:.0f} s")
    if args.json:
        data = asdict(report)
        data["results"] = [{**asdict(r), "combo": r.combo.label} for r in report.results]
        data["total_s"] = total
        args.json.write_text(json.dumps(data, indent=1))
    return 0 if report.flat else 1


if __name__ == "__main__":
    sys.exit(main())
