"""Ctrl-C and SIGTERM as an exception that TVM cannot swallow.

A Python exception raised while TVM runs Python code (a pass, a schedule rule, the linker callback) comes back out
of the TVM call as a plain ``RuntimeError``, so a ``KeyboardInterrupt`` from a signal can be turned into a
scheduling failure and caught. The handlers installed here therefore also *record* the signal: code that catches a
TVM ``RuntimeError`` calls :func:`raise_if_interrupted` first, stage boundaries and the final rename of a result
call it too, and the command line exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM) whenever one is
recorded, whatever exception carried it out.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator, Optional

HANDLED = (signal.SIGINT, signal.SIGTERM)

_pending: Optional[int] = None


class Interrupted(BaseException):
    """The process got SIGINT or SIGTERM. A BaseException, so ``except Exception`` blocks let it pass."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _record_and_raise(signum: int, _frame) -> None:
    global _pending
    _pending = signum
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Handle SIGINT and SIGTERM during one command (main thread only, as Python requires), starting with no
    signal recorded; the handlers before it are restored afterwards (the command may run inside a test)."""
    clear()
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, _record_and_raise) for signum in HANDLED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def pending() -> Optional[int]:
    """The signal received so far, if any."""
    return _pending


def raise_if_interrupted() -> None:
    """Raise :class:`Interrupted` when a signal arrived, even if the exception it raised was swallowed."""
    if _pending is not None:
        raise Interrupted(_pending)


def clear() -> None:
    """Forget a recorded signal (tests that interrupt one command and then run another in the same process)."""
    global _pending
    _pending = None


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back while cleaning up, so a second Ctrl-C cannot leave half-removed partial files;
    they are delivered (and raise) when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
