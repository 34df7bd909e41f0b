"""go_fast's fp8 matmuls, the mode of H100s and H200s, on the CPU.

torchao runs its float8 dynamic activation + weight quantization only on CUDA GPUs of compute
capability 8.9 or more, and so does our choice of mode, but only two hardware checks say so.
With them lifted, torch 2.13's CPU runs the fp8 products (`aten::_scaled_mm`, per-row and
per-tensor scales) for real, so the GPU's go_fast path is tested here. Nothing else changes.
(torch 2.11's CPU takes per-tensor scales only: there the mode falls back to per-tensor.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

PER_ROW_MODE = "fp8 matmuls (float8 dynamic activation + weight, per-row)"
# A folder for a server's PYTHONPATH: its sitecustomize lifts the checks in the server's process.
SITE_DIR = Path(__file__).parent / "fp8_matmuls_site"


def lift_hardware_checks(set_attribute: Callable[[object, str, object], None] = setattr) -> None:
    """Ours (`quant._has_fp8_matmuls`) and torchao's (`_check_hardware_support`); pass
    `monkeypatch.setattr` to have them back after a test."""
    import torchao.quantization.quant_api

    from flux_lora.device import quant

    set_attribute(quant, "_has_fp8_matmuls", lambda device: True)
    set_attribute(torchao.quantization.quant_api, "_check_hardware_support", lambda granularities: None)
