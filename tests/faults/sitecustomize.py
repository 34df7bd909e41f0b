"""Fault injection for tests/test_faults.py, loaded only by servers started with this folder on
PYTHONPATH (Python imports `sitecustomize` at start-up):
- generation raises torch's OutOfMemoryError for a prompt containing FAULT_OOM, as a GPU does
  when memory runs out;
- loading a LoRA whose reference contains FAULT_SLOW takes FAULT_SLOW_LOAD_S seconds longer (a
  large LoRA), and touches the file named by FAULT_LOAD_STARTED when it begins."""

import os
import time
from pathlib import Path

import torch

from flux_lora import pipeline
from flux_lora.lora import adapters

_generate = pipeline.FluxPipelines.generate
_load = adapters.AdapterSet._load


def _generate_or_run_out_of_memory(self, request, **kwargs):
    if "FAULT_OOM" in request.prompt:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")
    return _generate(self, request, **kwargs)


def _load_slowly(self, adapter, name):
    if "FAULT_SLOW" in adapter.display:
        if started := os.environ.get("FAULT_LOAD_STARTED"):
            Path(started).touch()
        time.sleep(float(os.environ.get("FAULT_SLOW_LOAD_S", "1")))
    return _load(self, adapter, name)


pipeline.FluxPipelines.generate = _generate_or_run_out_of_memory
adapters.AdapterSet._load = _load_slowly
