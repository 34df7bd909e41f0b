"""Fuzz the live server's `/openapi.json` with schemathesis: no 5xx, no dropped connection, and
`/health-check` never UNHEALTHY (or anything but READY/BUSY) during or after the run.

    ./scripts/fuzz [--examples N] [--max-time S] [--seed S]

Every operation the schema lists is fuzzed, with data that fits the schema (positive) and data
that does not (negative): POST /predictions gets most of the examples, the cheap GETs and the
cancel endpoint a few each.

What the fuzzer is given, and why. The schema is the one the server serves, with four changes
that steer, not hide: `input` is required in a prediction request, the input object takes no
unknown keys (coglet drops those), and optional inputs are not `nullable` (the served schema says
they are, but coglet answers a null with a 422), so positive examples are real predictions rather
than bodies without an input or with nulls. And `image` and `mask` are one of a few small data:
URI images: coglet downloads an http(s) URL given for an image itself, before run(), so a
generated URL would make it resolve random hostnames off this machine; the coverage phase's
placeholder URL is swapped for them too. Cost is bounded after generation: a `num_inference_steps` or `num_outputs`
inside the schema's bounds is lowered to at most 2, and one left out is set to its default or 2,
whichever is smaller (50 steps, 4 outputs at 1440x1440 take minutes on a CPU, and the default of
28 steps at 1024x1024 about 10 s); values outside the bounds are sent as generated (they must be
a 422). Sizes,
aspect ratios, megapixels, every other input, and the bounds' edges stay as generated.

A generated request the service refuses with a precise error (a 422, or a prediction whose status
is "failed") is fine; what counts as a finding: a 5xx, a connection dropped or timed out, a 200
whose prediction status is neither "succeeded" nor "failed", a health-check status other than
READY or BUSY, a worker process that changed (crashed and restarted), or a plain prediction that
does not succeed afterwards. Exits 1 on any finding, printing each with its exact request.

Measured on this 2-core machine, idle: the default (the coverage phase's 285 cases, then 150
generated prediction examples and 40 for each other operation; 457 requests) takes 80 s.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HEALTHY = {"READY", "BUSY"}
COST_CAPS = {"num_inference_steps": 2, "num_outputs": 2}
REQUEST_TIMEOUT_S = 120
QUICK = {"prompt": "a cat", "num_inference_steps": 1, "megapixels": "0.25", "seed": 1}


@dataclass
class Finding:
    what: str
    request: str  # method, path and body as sent
    response: str

    def __str__(self) -> str:
        return f"{self.what}\n    request:  {self.request}\n    response: {self.response}"


@dataclass
class FuzzReport:
    examples: Counter = field(default_factory=Counter)  # "<operation> <mode>" -> requests sent
    statuses: Counter = field(default_factory=Counter)  # "<HTTP status>[ <prediction status>]" -> count
    findings: list[Finding] = field(default_factory=list)
    health_seen: Counter = field(default_factory=Counter)
    failed_errors: Counter = field(default_factory=Counter)  # errors of predictions that failed
    rejected: Counter = field(default_factory=Counter)  # 4xx bodies, shortened
    skipped_for_time: int = 0
    retried_409: int = 0  # 409s to a lone client, sent again
    seconds: float = 0.0
    slowest: tuple[float, str] = (0.0, "")

    @property
    def total(self) -> int:
        return sum(self.examples.values())

    def summary(self) -> str:
        lines = [
            f"requests sent: {self.total} in {self.seconds:.0f} s"
            + (
                f" ({self.skipped_for_time} generated examples skipped: time budget spent)"
                if self.skipped_for_time
                else ""
            ),
            "  by operation and mode: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.examples.items())),
            "  responses: " + ", ".join(f"{k}: {v}" for k, v in sorted(self.statuses.items())),
            f"  409s to this lone client, sent again: {self.retried_409}",
            "  health-check statuses seen: "
            + ", ".join(f"{k}: {v}" for k, v in sorted(self.health_seen.items())),
            f"  slowest request: {self.slowest[0]:.1f} s: {self.slowest[1][:300]}",
        ]
        if self.failed_errors:
            lines.append("  predictions that failed (a precise error is fine):")
            lines.extend(f"    {n} x {error}" for error, n in self.failed_errors.most_common())
        if self.rejected:
            lines.append("  requests refused (4xx):")
            lines.extend(f"    {n} x {text}" for text, n in self.rejected.most_common())
        if self.findings:
            lines.append(f"FINDINGS ({len(self.findings)}):")
            lines.extend(f"  {finding}" for finding in self.findings)
        else:
            lines.append("findings: none")
        return "\n".join(lines)


def generation_schema(served: dict[str, Any]) -> dict[str, Any]:
    """The served schema, steered as the module docstring says."""
    schema = copy.deepcopy(served)
    components = schema["components"]["schemas"]
    request = components["PredictionRequest"]
    request["required"] = sorted({*request.get("required", []), "input"})
    components["Input"]["additionalProperties"] = False
    for prop in components["Input"]["properties"].values():
        # The schema marks optional inputs nullable, but coglet answers a null with a 422
        # (DESIGN.md): positive examples leave them out instead of sending null.
        prop.pop("nullable", None)
    for name, uris in _sample_images().items():
        # Only a few real images, as data: URIs: coglet itself downloads an http(s) URL given
        # for a Path input before run(), so a generated URL would send it to resolve random
        # hostnames off this machine; and img2img and inpaint get tested.
        prop = components["Input"]["properties"][name]
        prop.pop("format", None)
        prop["enum"] = uris
    return schema


def _real_images(case: Any, samples: dict[str, list[str]], index: int) -> None:
    """The coverage phase fills `image` and `mask` with one placeholder URL (https://0.com),
    which fails in coglet's download before run(): swap in sample images, in turn (in place)."""
    body = getattr(case, "body", None)
    inputs = body.get("input") if isinstance(body, dict) else None
    if not isinstance(inputs, dict):
        return
    for name, uris in samples.items():
        if isinstance(inputs.get(name), str) and inputs[name].startswith(("http://", "https://")):
            inputs[name] = uris[index % len(uris)]


def _sample_images() -> dict[str, list[str]]:
    """data: URIs of small images for `image` and masks for `mask`, odd sizes included."""
    import base64
    import io

    from PIL import Image

    def uri(image: Image.Image, fmt: str) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt)
        return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"

    images = [
        uri(Image.new("RGB", (300, 200), (200, 40, 40)), "PNG"),
        uri(Image.new("RGB", (17, 251), (20, 200, 40)), "JPEG"),
        uri(Image.new("RGBA", (64, 64), (20, 40, 200, 128)), "WEBP"),
    ]
    masks = [uri(Image.new("L", (300, 200), 255), "PNG"), uri(Image.new("1", (5, 7), 1), "PNG")]
    return {"image": images, "mask": masks}


def cap_cost(case: Any, served_input: dict[str, Any]) -> None:
    """Lower in-bounds cost knobs of a generated prediction to COST_CAPS (in place)."""
    body = getattr(case, "body", None)
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return
    inputs = body["input"]
    for name, cap in COST_CAPS.items():
        if name not in inputs:  # the default (28 steps) would cost as much as a large value
            inputs[name] = min(cap, served_input["properties"].get(name, {}).get("default", cap))
            continue
        value = inputs[name]
        bounds = served_input["properties"].get(name, {})
        if (
            isinstance(value, int)
            and not isinstance(value, bool)
            and bounds.get("minimum", float("-inf")) <= value <= bounds.get("maximum", float("inf"))
        ):
            inputs[name] = min(value, cap)


class HealthWatch:
    """Polls /health-check in a thread and counts what it says."""

    def __init__(self, url: str, period: float = 0.25):
        self.url, self.period = url, period
        self.seen: Counter = Counter()
        self.bad: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url + "/health-check", timeout=10) as response:
                    status = json.load(response).get("status", "?")
            except Exception as err:  # a refused or dropped health-check is itself a finding
                status = f"error: {err.__class__.__name__}: {err}"
            self.seen[status] += 1
            if status not in HEALTHY:
                self.bad.append(f"{time.strftime('%H:%M:%S')} {status}")
            self._stop.wait(self.period)

    def __enter__(self) -> HealthWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def describe(case: Any) -> str:
    """The request as sent: method, path, query, headers, media type and body."""
    body = getattr(case, "body", None)
    if isinstance(body, (dict, list, str, int, float, bool)) or body is None:
        try:
            shown = json.dumps(body, ensure_ascii=True)
        except (TypeError, ValueError):
            shown = repr(body)
    elif isinstance(body, bytes):
        shown = repr(body)
    else:
        shown = ""  # no body
    parts = [case.method.upper(), getattr(case, "formatted_path", case.path)]
    if case.query:
        parts.append(f"query={case.query!r}")
    if case.headers:
        parts.append(f"headers={dict(case.headers)!r}")
    if shown:
        parts.append(f"{case.media_type or ''} {shown}".strip())
    return " ".join(parts)


def fuzz(
    url: str,
    *,
    prediction_examples: int = 150,
    other_examples: int = 40,
    max_time: float = 600,
    seed: int = 0,
    worker: Any = None,
    coverage: bool = True,
) -> FuzzReport:
    """Fuzz the server at `url`. `worker` (optional) is a callable returning coglet's worker pid,
    to notice a worker that died and was replaced."""
    import requests
    import schemathesis
    from schemathesis import GenerationMode

    with urllib.request.urlopen(url + "/openapi.json", timeout=10) as response:
        served = json.load(response)
    schema = schemathesis.openapi.from_dict(generation_schema(served))
    samples = _sample_images()
    served_input = served["components"]["schemas"]["Input"]
    report = FuzzReport()
    deadline = time.monotonic() + max_time
    started = time.monotonic()
    session = requests.Session()
    worker_before = worker() if worker else None

    def exercise(case: Any, label: str) -> None:
        if time.monotonic() > deadline:
            report.skipped_for_time += 1
            return
        cap_cost(case, served_input)
        report.examples[label] += 1
        sent = describe(case)
        t0 = time.monotonic()
        try:
            for _ in range(4):
                response = case.call(base_url=url, session=session, timeout=REQUEST_TIMEOUT_S)
                if response.status_code != 409:
                    break
                # coglet's 409 between back-to-back requests (DESIGN.md): send it again, so the
                # generated input is really tried.
                report.retried_409 += 1
                time.sleep(0.2)
        except Exception as err:  # dropped connection, timeout: a finding
            report.statuses[f"error {err.__class__.__name__}"] += 1
            report.findings.append(
                Finding(f"{label}: no response ({err.__class__.__name__})", sent, str(err)[:500])
            )
            return
        elapsed = time.monotonic() - t0
        if elapsed > report.slowest[0]:
            report.slowest = (elapsed, sent)
        key = str(response.status_code)
        prediction_status = None
        if case.path == "/predictions" and case.method.upper() == "POST" and response.status_code == 200:
            try:
                prediction_status = response.json().get("status")
            except ValueError:
                prediction_status = "<not JSON>"
            key += f" {prediction_status}"
        report.statuses[key] += 1
        if prediction_status == "failed":
            report.failed_errors[_first_line(response.json().get("error"))] += 1
        elif 400 <= response.status_code < 500:
            report.rejected[f"{response.status_code} {_first_line(response.text)}"] += 1
        if response.status_code >= 500:
            report.findings.append(
                Finding(f"{label}: HTTP {response.status_code}", sent, response.text[:1000])
            )
        elif prediction_status is not None and prediction_status not in ("succeeded", "failed"):
            report.findings.append(
                Finding(f"{label}: prediction status {prediction_status!r}", sent, response.text[:1000])
            )

    with HealthWatch(url) as watch:
        operations = [result.ok() for result in schema.get_all_operations()]
        if coverage:
            # schemathesis's coverage phase: deterministic boundary and type-confusion cases,
            # each input alone at its edges, plus methods the schema does not list.
            modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
            for operation in operations:
                config = schema.config.generation_for(operation=operation, phase="coverage")
                cases = schema.iter_coverage_cases(
                    operation, generation_modes=modes, generation_config=config
                )
                for index, case in enumerate(cases):
                    _real_images(case, samples, index)
                    exercise(case, f"{operation.method.upper()} {operation.path} coverage")
        for operation in operations:
            is_prediction = operation.path == "/predictions"
            examples = prediction_examples if is_prediction else other_examples
            modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
            if is_prediction:
                shares = {
                    GenerationMode.POSITIVE: (2 * examples) // 3,
                    GenerationMode.NEGATIVE: examples // 3,
                }
            else:
                shares = {GenerationMode.POSITIVE: examples // 2, GenerationMode.NEGATIVE: examples // 2}
            for mode in modes:
                label = f"{operation.method.upper()} {operation.path} {mode.value}"
                count = shares[mode]
                if count < 1:
                    continue

                run = _hypothesis_run(
                    operation.as_strategy(generation_mode=mode), count, seed, label, exercise
                )
                try:
                    run()
                except Exception as err:
                    # Hypothesis cannot generate negative data for an operation without inputs
                    # (GET /, GET /health-check): nothing to send.
                    if err.__class__.__name__ != "Unsatisfiable":
                        raise
        time.sleep(0.5)  # one more health sample after the last request

    report.health_seen = watch.seen
    for bad in watch.bad:
        report.findings.append(Finding(f"health-check not READY/BUSY: {bad}", "GET /health-check", bad))
    if worker is not None and worker() != worker_before:
        report.findings.append(
            Finding("coglet's worker process changed during the fuzz", "", f"{worker_before} -> {worker()}")
        )
    status, body = _post_json(url + "/predictions", {"input": QUICK})
    if status != 200 or body.get("status") != "succeeded":
        report.findings.append(
            Finding("a plain prediction after the fuzz did not succeed", json.dumps(QUICK), str(body)[:1000])
        )
    report.seconds = time.monotonic() - started
    return report


def _first_line(text: object, width: int = 160) -> str:
    return str(text).strip().splitlines()[0][:width] if str(text).strip() else "<empty>"


def _hypothesis_run(strategy: Any, count: int, seed: int, label: str, exercise: Any) -> Any:
    """A Hypothesis test that hands `count` examples of `strategy` to `exercise`, without
    shrinking (every example is a prediction: findings are collected, not raised)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed

    @hypothesis_seed(seed)
    @settings(
        max_examples=count,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def run(case: Any) -> None:
        exercise(case, label)

    return run


def _post_json(url: str, payload: dict) -> tuple[int, dict]:
    import requests

    for _ in range(3):  # a 409 now and then between back-to-back requests: retried
        response = requests.post(url, json=payload, timeout=REQUEST_TIMEOUT_S)
        if response.status_code != 409:
            break
        time.sleep(0.2)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, {"detail": response.text}


@contextmanager
def fuzz_server(folder: Path):
    """The real server on the tiny model; LoRA services pointed at a closed loopback port."""
    from flux_lora.dev.cog_server import CogServer
    from flux_lora.models import layout
    from flux_lora.testing import tiny
    from tests.load.soak import worker_pid

    closed = "http://127.0.0.1:9"
    env = {
        "FLUX_MODEL_DIR": str(tiny.build(layout.TINY_MODEL_DIR)),
        "FLUX_LORA_CACHE_DIR": str(folder / "lora-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "FLUX_LORA_REPLICATE_URL": closed,
        "HF_ENDPOINT": closed,
        "FLUX_LORA_CIVITAI_URL": closed,
    }
    with CogServer(env=env, log_path=folder / "coglet.log") as server:
        health = server.start()
        if health["status"] != "READY":
            raise RuntimeError(f"server not READY: {health['status']}")
        yield server, (lambda: worker_pid(server.process.pid))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/fuzz", description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=150, help="POST /predictions examples (default 150)")
    parser.add_argument("--other-examples", type=int, default=40, help="examples for each other operation")
    parser.add_argument("--max-time", type=float, default=600, help="time budget in seconds (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-coverage", action="store_true", help="skip the deterministic coverage phase")
    parser.add_argument("--keep-log", type=Path, help="copy coglet's log here afterwards")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="flux-lora-fuzz-") as tmp, ExitStack() as stack:
        server, worker = stack.enter_context(fuzz_server(Path(tmp)))
        report = fuzz(
            server.url,
            prediction_examples=args.examples,
            other_examples=args.other_examples,
            max_time=args.max_time,
            seed=args.seed,
            worker=worker,
            coverage=not args.no_coverage,
        )
        stack.close()
        if args.keep_log:
            args.keep_log.write_bytes((Path(tmp) / "coglet.log").read_bytes())
    print(report.summary())
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
