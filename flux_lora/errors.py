"""The few errors the package raises. Each is also a builtin, so callers can catch either."""


class FluxLoraError(Exception):
    """Base class: the message is meant for the user who sent the request."""


class InputError(FluxLoraError, ValueError):
    """A request that breaks a rule; the message names the input, the value and the fix."""


class ModelNotFoundError(FluxLoraError, FileNotFoundError):
    """The FLUX weights are not where the configuration says they are."""


class UnsafeImageError(FluxLoraError, RuntimeError):
    """Every generated image was flagged by the safety checker."""


class CanceledError(FluxLoraError, RuntimeError):
    """The prediction was canceled; raised inside the work so it stops at the next step."""


class GenerationMemoryError(FluxLoraError, MemoryError):
    """The device ran out of memory for this request; smaller requests still fit."""
