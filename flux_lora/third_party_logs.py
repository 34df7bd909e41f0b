"""Lines the pinned libraries log at setup that say nothing about this container, dropped one by one.

diffusers imports torchao whenever it is installed (diffusers/quantizers/auto.py), so every setup
imports torchao; diffusers' FLUX pipelines import transformers' image processors. Four of the
messages this logs (six lines) are about the libraries' versions among themselves, not about us.
Each filter below drops exactly one message, on the one logger that emits it, and only where it
cannot be acted on; every other line of those loggers passes. `install()` must run before diffusers
is first imported.

torchao's CUDA kernels that a CPU-only torch cannot load are not filtered: the bootstrap leaves
them out of the CPU venv (scripts/_bootstrap.sh).
"""

from __future__ import annotations

import importlib.util
import logging

import torch

# torch/utils/_pytree.py:630, on `register_constant(<an Enum>)`. torchao 0.18's
# `register_as_pytree_constant` (torchao/utils.py:45) registers its config enums (KernelPreference,
# ScaleCalculationMode) that way; torch 2.13 handles enums natively and only deprecates the call,
# which still works. The note is for torchao's authors (pytorch/ao#4848, fix in pytorch/ao#4849).
PYTREE_LOGGER = "torch.utils._pytree"
PYTREE_ENUM_DEPRECATION = "%s is an Enum subclass and is now natively supported by torch.compile"

# diffusers/quantizers/torchao/torchao_quantizer.py:94. diffusers 0.42.1 allow-lists torchao's
# legacy tensor classes for torch.load from `torchao.dtypes` (NF4Tensor, UintxTensor), which torchao
# 0.17 removed from there (huggingface/diffusers#14303), so the import fails with every torchao we
# can pin. Only pickled torchao checkpoints would need them; we load safetensors only, and go_fast
# quantizes in memory.
DIFFUSERS_TORCHAO_LOGGER = "diffusers.quantizers.torchao.torchao_quantizer"
DIFFUSERS_TORCHAO_SAFE_GLOBALS = "Unable to import `torchao` Tensor objects."

# torchao/kernel/intmm.py:27. torchao's int8 matmul kernels are Triton (GPU) kernels; a CPU-only
# torch ships no Triton and could not run them with it. A CUDA or ROCm torch depends on Triton,
# so there the line would mean a broken install, and it is kept.
TORCHAO_INTMM_LOGGER = "torchao.kernel.intmm"
TORCHAO_NO_TRITON = "Warning: Detected no triton, on systems without Triton certain kernels will not work"

# transformers/utils/import_utils.py:2671, once per name. diffusers imports these two at module
# level for IP-adapter feature extractors (pipelines/flux/pipeline_flux_img2img.py:20,
# loaders/ip_adapter.py:39), which we never load; without torchvision, which the image does not
# ship, transformers gives the PIL processors instead, the ones we want. Other names keep the line.
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
PIL_FALLBACK_NAMES = ("CLIPImageProcessor", "SiglipImageProcessor")
PIL_FALLBACK = "`{name}` requires torchvision (not installed); falling back to `{name}Pil`"


def cpu_only_torch() -> bool:
    return torch.version.cuda is None and torch.version.hip is None


def torchvision_installed() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _DropKnownLines(logging.Filter):
    """Drops the records `known` says are one of the lines above; passes every other."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not known(record)


def known(record: logging.LogRecord) -> bool:
    """Whether `record` is one of the lines above, in the circumstances it is dropped in."""
    try:
        return _known(record)
    except Exception:  # a record we cannot read is not one of ours to drop; never raise into a library
        return False


def _known(record: logging.LogRecord) -> bool:
    if record.name == PYTREE_LOGGER:
        cls = record.args[0] if isinstance(record.args, tuple) and record.args else None
        return (
            str(record.msg).startswith(PYTREE_ENUM_DEPRECATION)
            and isinstance(cls, type)
            and cls.__module__.startswith("torchao.")
        )
    if record.name == DIFFUSERS_TORCHAO_LOGGER:
        return record.getMessage().startswith(DIFFUSERS_TORCHAO_SAFE_GLOBALS) and not _legacy_torchao_dtypes()
    if record.name == TORCHAO_INTMM_LOGGER:
        return record.getMessage() == TORCHAO_NO_TRITON and cpu_only_torch()
    if record.name == TRANSFORMERS_IMPORT_LOGGER:
        message = record.getMessage()
        return not torchvision_installed() and any(
            message.startswith(PIL_FALLBACK.format(name=name)) for name in PIL_FALLBACK_NAMES
        )
    return False


def _legacy_torchao_dtypes() -> bool:
    """Whether the installed torchao still has the module diffusers imports the classes from."""
    try:
        return importlib.util.find_spec("torchao.dtypes.uintx") is not None
    except ImportError:  # no torchao, or no torchao.dtypes at all
        return False


_DROP_KNOWN_LINES = _DropKnownLines()  # one instance: addFilter is then idempotent
LOGGERS = (PYTREE_LOGGER, DIFFUSERS_TORCHAO_LOGGER, TORCHAO_INTMM_LOGGER, TRANSFORMERS_IMPORT_LOGGER)


def install() -> None:
    """Adds the filter to the four loggers; idempotent. Call before diffusers is first imported."""
    for name in LOGGERS:
        logging.getLogger(name).addFilter(_DROP_KNOWN_LINES)
