"""`scripts/bench-gpu --tiny`: the GPU benchmark's harness, run whole at CI size on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = {
    "device", "date", "command", "dev_bf16_s", "dev_fp8_s", "schnell_bf16_s", "schnell_fp8_s",
    "dev_fp8_4_outputs_s", "lora_swap_s", "recompiles_on_swap", "ready_cold_s", "ready_warm_s",
    "peak_mem_gib", "fp8_rel_err", "fp8_lora_effect_ratio_x1", "fp8_lora_effect_ratio_x1_5",
}  # fmt: skip


def test_bench_gpu_tiny_writes_every_figure(tmp_path: Path):
    out = tmp_path / "tiny.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    done = subprocess.run(
        ["./scripts/bench-gpu", "--tiny", "--runs", "1", "--out", str(out)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == KEYS
    assert results["device"].startswith("cpu")
    assert results["recompiles_on_swap"] == 0
    timings = [key for key in KEYS if key.endswith("_s")]
    assert all(results[key] > 0 for key in timings), results
    assert results["dev_fp8_4_outputs_s"] > results["dev_fp8_s"]  # four images cost more than one
    assert 0 < results["fp8_rel_err"] < 0.2  # fp8 is close to, and not the same as, the original
    # The LoRA's effect on the fp8 copy is the bf16 one (the adapter computes in the model's dtype),
    # so the schema's 1.5x makes it 1.5 times as strong: what go_fast users get, as documented.
    assert 0.9 < results["fp8_lora_effect_ratio_x1"] < 1.1
    assert 1.35 < results["fp8_lora_effect_ratio_x1_5"] < 1.65
