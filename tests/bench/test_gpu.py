"""`scripts/bench-gpu --tiny`: the GPU benchmark's harness, run whole at CI size on the CPU, and
cut short by its budget."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from flux_lora.models.layout import REPO_ROOT

FIGURES = {
    "ready_eager_s", "eager_faults", "bare_dev_s", "dev_bf16_eager_s", "dev_bf16_eager_s_vs_bare",
    "safety_check_s", "save_webp_s", "webp_kb", "overhead_rest_s",
    "fp8_copy_s", "fp8_mode", "dev_fp8_eager_s", "fp8_rel_err", "schnell_fp8_eager_s", "move_off_first_s",
    "move_on_s", "move_off_s", "move_roundtrip_identical", "peak_mem_eager_gib", "disk_read_gbps",
    "sha256_gbps", "ready_cold_s", "setup_compilations", "compiled_faults", "dev_fp8_s", "dev_bf16_s",
    "dev_bf16_s_vs_bare", "schnell_fp8_s", "schnell_bf16_s", "request_compilations", "lora_swap_s",
    "recompiles_on_swap", "lokr_bf16_load_s", "lokr_fp8_load_s", "recompiles_on_lokr", "fp8_lora_effect_ratio_x1", "fp8_lora_effect_ratio_x1_5", "peak_mem_gib",
    "dev_fp8_4_outputs_s", "exercised_faults", "ready_warm_s", "warm_request_compilations",
}  # fmt: skip

# The whole harness at CI size: minutes on 2 cores, so in the slow tier.
pytestmark = pytest.mark.slow


def bench(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    return subprocess.run(
        ["./scripts/bench-gpu", "--tiny", "--runs", "1", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_bench_gpu_tiny_writes_every_figure(tmp_path: Path):
    out = tmp_path / "tiny.json"
    done = bench("--out", str(out), "--logs", str(tmp_path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) >= FIGURES, FIGURES - set(results)
    assert {phase: state["status"] for phase, state in results["phases"].items()} == dict.fromkeys(
        ("eager", "disk", "cold", "warm"), "done"
    )
    assert results["device"].startswith("cpu")
    assert [results[k] for k in ("eager_faults", "compiled_faults", "exercised_faults")] == [[], [], []]
    assert results["setup_compilations"] == 4  # one graph per block class, bf16 and fp8
    assert results["recompiles_on_swap"] == 0 and results["request_compilations"] == 0
    assert results["recompiles_on_lokr"] == 0
    assert results["warm_request_compilations"] == 0
    assert results["move_roundtrip_identical"] is True
    assert results["dev_bf16_eager_s_vs_bare"] == round(
        results["dev_bf16_eager_s"] / results["bare_dev_s"], 3
    )
    # Our time beyond the bare call's, in parts: each measured, the rest what they leave.
    parts = [results[k] for k in ("bare_dev_s", "safety_check_s", "save_webp_s", "overhead_rest_s")]
    assert sum(parts) == pytest.approx(results["dev_bf16_eager_s"], abs=1e-3)
    assert results["safety_check_s"] > 0 and results["save_webp_s"] > 0 and results["webp_kb"] > 0
    assert results["dev_fp8_4_outputs_s"] > results["dev_fp8_s"]  # four images cost more than one
    assert 0 < results["fp8_rel_err"] < 0.2  # fp8 is close to, and not the same as, the original
    # The LoRA's effect on the fp8 copy is the bf16 one (the adapter computes in the model's dtype),
    # so the schema's 1.5x makes it 1.5 times as strong: what go_fast users get, as documented.
    assert 0.9 < results["fp8_lora_effect_ratio_x1"] < 1.1
    assert 1.35 < results["fp8_lora_effect_ratio_x1_5"] < 1.65
    assert {"eager.log", "disk.log", "cold.log", "warm.log"} <= {p.name for p in tmp_path.iterdir()}


def test_a_run_cut_short_keeps_every_figure_it_printed(tmp_path: Path):
    """A compiled setup alone takes longer than 8 s here, so the cold phase is cut at its bound;
    the warm one is cut too or skipped, as the budget allows; the whole run keeps to the budget,
    and every figure printed before a cut is in the file."""
    out = tmp_path / "cut.json"
    done = bench("--phase-bound", "8", "--budget", "20", "--phases", "disk,cold,warm", "--out", str(out))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    phases = {name: state["status"] for name, state in results["phases"].items()}
    assert phases["disk"] == "done"
    assert phases["cold"] == "cut at its bound of 8 s"
    assert phases["warm"].startswith(("cut at its bound of ", "skipped: ")), phases
    assert results["total_s"] < 20 + 3
    printed = set(re.findall(r"^\[bench\] (\w+): ", done.stdout, flags=re.M)) - set(phases)
    assert {"disk_read_gbps", "sha256_gbps"} <= printed <= set(results)


def test_strict_fails_a_run_whose_phase_was_cut(tmp_path: Path):
    """`--strict` (the CPU rehearsal's): a phase not done is a failure, named."""
    done = bench("--strict", "--phases", "disk", "--phase-bound", "0.001", "--out", str(tmp_path / "x.json"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "phases not done: {'disk': 'cut at its bound of 0 s'}" in done.stderr
