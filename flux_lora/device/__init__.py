"""How the pipelines run on the device: `choice` (device and dtype), `placement` (what stays on the
GPU), `quant` (fp8 copies), `compilation` (torch.compile), `tensors` and `inventory` (what is held)."""
