"""Graceful shutdown: on SIGTERM readiness turns 503 at once, in-flight requests finish, exit 0.

uvicorn, on SIGTERM, stops accepting connections, waits for open ones up to
`timeout_graceful_shutdown`, runs the lifespan shutdown and returns. The app's lifespan puts
`drain_on_sigterm` in front of uvicorn's handler: it flips the app's `Drain` first (`/readyz`
answers 503 "draining", answers carry `Connection: close`), then, after
`shutdown_delay_seconds` (time for a load balancer to see the 503 and stop routing here), hands
the signal to uvicorn. `exit_zero_on_sigterm`, around `uvicorn.run`, makes the stop that was
asked for and carried out exit with status 0 (uvicorn re-raises the signal once it is done).
"""

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from fastapi import FastAPI

log = logging.getLogger(__name__)

SignalHandler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class Drain:
    """Set once the process has been asked to stop; never cleared."""

    def __init__(self) -> None:
        self._event = threading.Event()

    @property
    def draining(self) -> bool:
        return self._event.is_set()

    def begin(self) -> None:
        self._event.set()


def is_draining(app: FastAPI) -> bool:
    drain = getattr(app.state, "drain", None)
    return isinstance(drain, Drain) and drain.draining


class _Handover:
    """Passes the signal on to the handler that was there before, now or after a delay."""

    def __init__(self, previous: SignalHandler, delay_seconds: float) -> None:
        self.previous = previous
        self.delay_seconds = delay_seconds
        self._timer: threading.Timer | None = None
        self._handed_over = False
        # Re-entrant: the signal handler may interrupt the main thread while it holds it.
        self._lock = threading.RLock()

    def schedule(self, sig: int, frame: FrameType | None) -> None:
        """Called in the main thread, by the signal handler."""
        previous = self.previous
        if not callable(previous):
            # No Python handler before us: do at once what the default would have done.
            if previous != signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
                signal.raise_signal(sig)
            return
        with self._lock:
            pending, self._timer = self._timer, None
            wait = pending is None and not self._handed_over and self.delay_seconds > 0
            if wait:
                self._timer = threading.Timer(self.delay_seconds, self.fire, (sig, None))
                self._timer.daemon = True
                self._timer.start()
        if wait:
            return
        if pending is not None:
            pending.cancel()  # a second SIGTERM while waiting: stop now
        self.fire(sig, frame)

    def fire(self, sig: int, frame: FrameType | None) -> None:
        with self._lock:
            self._timer = None
            self._handed_over = True
        if callable(self.previous):
            self.previous(sig, frame)

    def cancel(self) -> None:
        with self._lock:
            pending, self._timer = self._timer, None
        if pending is not None:
            pending.cancel()


@contextmanager
def drain_on_sigterm(drain: Drain, delay_seconds: float = 0.0) -> Iterator[None]:
    """While open (the app's lifespan), SIGTERM begins `drain`, then goes to the handler
    installed before (uvicorn's `Server.handle_exit`) after `delay_seconds`.

    Only in the main thread, where a server installs its handlers: an app run by a test
    client (lifespan in a worker thread) is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: SignalHandler = signal.getsignal(signal.SIGTERM)
    handover = _Handover(previous, delay_seconds)

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        if not drain.draining:
            drain.begin()
            log.info(
                "SIGTERM: draining; readiness is 503, stopping in %.1f s",
                max(0.0, delay_seconds),
            )
        handover.schedule(sig, frame)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        handover.cancel()
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, previous)


def _exit_zero(sig: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


@contextmanager
def exit_zero_on_sigterm() -> Iterator[None]:
    """Around `uvicorn.run`: a SIGTERM that reaches the process's own handler (before uvicorn
    has installed its, or re-raised by uvicorn after its graceful shutdown) exits with 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_zero)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
