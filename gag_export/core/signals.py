"""SIGTERM and SIGHUP stop a command the way Ctrl-C does: the exception unwinds through every
`finally`, so temp files and folders are removed, and the CLI exits 128 + the signal's number.

SIGTERM is how containers, CI runners and job schedulers stop a job; Python's default for it is
to die at once, leaving a half-written export folder behind (gigabytes for a full-size model).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

# The signals a command handles like Ctrl-C (SIGHUP: the terminal went away).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
# Signals received inside `terminate_on_signals`. Python runs a handler between any two bytecodes,
# also inside a `__del__` or a callback from C, where the exception it raises is printed and
# dropped; the record lets the work stop at its next checkpoint, and the CLI report it anyway.
_received: list[int] = []


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM/SIGHUP; a KeyboardInterrupt, so every cleanup path that
    handles Ctrl-C handles it too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.name = signal.Signals(signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@contextlib.contextmanager
def terminate_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """While inside, `signals` raise `Terminated` in the main thread (elsewhere this does nothing:
    only the main thread may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        _received.append(signum)
        raise Terminated(signum)

    _received.clear()
    previous = {sig: signal.signal(sig, stop) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def received() -> int | None:
    """The first stop signal received inside `terminate_on_signals` (None: none)."""
    return _received[0] if _received else None


def raise_if_terminated() -> None:
    """A checkpoint for long work: raise `Terminated` if a stop signal came and its exception was lost."""
    if _received:
        raise Terminated(_received[0])


__all__ = ["STOP_SIGNALS", "Terminated", "raise_if_terminated", "received", "terminate_on_signals"]
