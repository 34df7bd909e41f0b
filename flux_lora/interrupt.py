"""Stopping a prediction in any phase: a cancel, or a wall-clock limit that has passed.

coglet cancels by raising in the thread that called `predict`, while the work runs on the torch
thread. An `Interrupt` carries the stop from one to the other. The work calls `check()` between
its steps (each chunk of a download or a tarball, each LoRA, each denoising step) and raises
there. A read that blocks on a socket is woken by the abort callback its reader registered with
`on_stop` (it shuts the socket down). The waiting thread calls `poll()` every few tens of
milliseconds, which turns a passed limit into a stop even while the work is blocked.

Limits: one for each phase of a prediction, one for each download. A stop is final for the
prediction: the first reason wins and every later `check()` raises it again.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import BinaryIO

from flux_lora.errors import CanceledError, ConfigError, DeadlineError, FluxLoraError

# Phase -> (what it covers, the variable that sets its limit, the default in seconds).
PHASES = {
    "fetch": ("downloading and unpacking the inputs and LoRAs", "FLUX_LORA_FETCH_LIMIT_S", 900.0),
    "load": ("loading the LoRAs into the transformer", "FLUX_LORA_LOAD_LIMIT_S", 300.0),
    "generate": ("denoising and decoding the images", "FLUX_LORA_GENERATE_LIMIT_S", 1800.0),
}
DOWNLOAD_LIMIT_ENV = "FLUX_LORA_DOWNLOAD_LIMIT_S"
DEFAULT_DOWNLOAD_LIMIT_S = 600.0  # 2 GiB, the largest LoRA, at 3.6 MB/s


def seconds_from_env(variable: str, default: float) -> float:
    raw = os.environ.get(variable, "").strip()
    if not raw:
        return default
    try:
        seconds = float(raw)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(
            f"{variable}={raw!r} is not a duration: set a number of seconds above 0, or unset it for "
            f"the default of {default:g}"
        )
    return seconds


def phase_limits_from_env() -> dict[str, float]:
    return {phase: seconds_from_env(variable, default) for phase, (_, variable, default) in PHASES.items()}


class Interrupt:
    def __init__(self, phase_limits: dict[str, float] | None = None) -> None:
        self.phase_limits = phase_limits or {}  # a phase without a limit runs as long as it takes
        self._lock = threading.Lock()
        self._stopped: FluxLoraError | None = None
        self._deadlines: dict[int, tuple[float, Callable[[], FluxLoraError]]] = {}
        self._aborts: dict[int, Callable[[], None]] = {}
        self._phase_started: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Within the block, the phase's limit applies. A phase entered again (the inputs, then the
        LoRAs, are both fetched) goes on counting from its first start."""
        what, variable, _ = PHASES[name]
        started = self._phase_started.setdefault(name, time.monotonic())
        seconds = self.phase_limits.get(name)
        if seconds is None:
            yield
            return
        message = (
            f"The prediction stopped: {what} took longer than its limit of {seconds:g} s. "
            f"The operator sets this limit with {variable}."
        )
        with self._deadline_at(started + seconds, lambda: DeadlineError(message)):
            yield

    def deadline(self, seconds: float, error: Callable[[], FluxLoraError]):
        """Within the block, stop with `error()` once `seconds` have passed."""
        return self._deadline_at(time.monotonic() + seconds, error)

    @contextmanager
    def _deadline_at(self, due: float, error: Callable[[], FluxLoraError]) -> Iterator[None]:
        token = object()
        with self._lock:
            self._deadlines[id(token)] = (due, error)
        try:
            yield
        finally:
            with self._lock:
                self._deadlines.pop(id(token), None)

    @contextmanager
    def on_stop(self, abort: Callable[[], None]) -> Iterator[None]:
        """Within the block, a stop also calls `abort` (from whichever thread stops it)."""
        token = object()
        with self._lock:
            self._aborts[id(token)] = abort
            stopped = self._stopped is not None
        if stopped:
            _call_quietly(abort)
        try:
            yield
        finally:
            with self._lock:
                self._aborts.pop(id(token), None)

    def cancel(self) -> None:
        self._stop(CanceledError("canceled"))

    def poll(self) -> None:
        """Stop if a limit has passed. Cheap; the waiting thread calls it in a loop."""
        now = time.monotonic()
        with self._lock:
            expired = [error for due, error in self._deadlines.values() if now >= due]
        if expired:
            self._stop(expired[0]())

    def check(self) -> None:
        """Raise the reason the prediction stopped, if it has."""
        self.poll()
        if self._stopped is not None:
            raise self._stopped

    def _stop(self, reason: FluxLoraError) -> None:
        with self._lock:
            if self._stopped is not None:
                return
            self._stopped = reason
            aborts = list(self._aborts.values())
        for abort in aborts:
            _call_quietly(abort)


class CheckedReader:
    """A file-like reader that checks `interrupt` before every read: what makes unpacking a
    tarball from memory or a local file stoppable between chunks."""

    def __init__(self, source: BinaryIO, interrupt: Interrupt) -> None:
        self.source = source
        self.interrupt = interrupt

    def read(self, size: int = -1) -> bytes:
        self.interrupt.check()
        return self.source.read(size)


def _call_quietly(abort: Callable[[], None]) -> None:
    with suppress(OSError):  # the socket closed on its own meanwhile: nothing left to wake
        abort()
