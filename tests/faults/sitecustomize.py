"""Fault injection for tests/test_faults.py, loaded only by servers started with this folder on
PYTHONPATH (Python imports `sitecustomize` at start-up): generation raises torch's
OutOfMemoryError for a prompt containing FAULT_OOM, as a GPU does when memory runs out."""

import torch

from flux_lora import pipeline

_generate = pipeline.FluxPipelines.generate


def _generate_or_run_out_of_memory(self, request, **kwargs):
    if "FAULT_OOM" in request.prompt:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by a test)")
    return _generate(self, request, **kwargs)


pipeline.FluxPipelines.generate = _generate_or_run_out_of_memory
