"""Every error the package raises. Each is also a builtin, so callers can catch either.

The message of each is meant for the person who can fix it: the user who sent the request, or the
operator who configured the container.
"""


class FluxLoraError(Exception):
    """Base class: the message is meant for the user who sent the request."""


class InputError(FluxLoraError, ValueError):
    """A request that breaks a rule; the message names the input, the value and the fix."""


class ConfigError(FluxLoraError, ValueError):
    """An environment variable the operator set breaks a rule; the message names it, its value
    and the fix."""


class DownloadError(FluxLoraError, OSError):
    """A download failed: unreachable, refused, cut off or timed out; the message says what to do."""


class CacheError(FluxLoraError, OSError):
    """The LoRA cache folder cannot be used: bad configuration, a full disk, a failed rename."""


class ModelNotFoundError(FluxLoraError, FileNotFoundError):
    """The FLUX weights are not where the configuration says they are."""


class UnsafeImageError(FluxLoraError, RuntimeError):
    """Every generated image was flagged by the safety checker."""


class CanceledError(FluxLoraError, RuntimeError):
    """The prediction was canceled; raised inside the work so it stops at the next step."""


class DeadlineError(FluxLoraError, TimeoutError):
    """A download or a phase of the prediction ran past its wall-clock limit; the message names
    which, the limit and the variable that sets it."""


class GenerationMemoryError(FluxLoraError, MemoryError):
    """The device ran out of memory for this request; smaller requests still fit."""
