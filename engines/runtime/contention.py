"""Whether short requests are running now: long batch work leaves them the cores.

Batch work (occlusion, SmoothGrad, the perturbation methods, ...) may run on sessions with more
intra-op threads than short requests use. On a small machine those threads take the cores a
short request needs (measured on 2 cores: predict and Grad-CAM p50 ~15% slower beside two big
jobs), so a batch takes its wide session only while no short run is in flight or ended within
`QUIET_SECONDS`; otherwise it runs on the short session, whose threads leave room.

A thread that asked for batch work's sessions is doing batch work until its request ends (its
deadline changes): its own runs, the clean passes included, never count as short.
"""

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from engines.runtime.deadline import Deadline, current_deadline

QUIET_SECONDS = 0.05
"""How long after the last short run batch work waits before it widens again."""

_NO_REQUEST = object()


def _request() -> Deadline | object:
    """The current request: its deadline, or one token for work outside any request."""
    return current_deadline() or _NO_REQUEST


class ShortRuns:
    """Short runs in flight and the last to end, by request (a request's own never block it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight: dict[object, int] = {}
        self._last_end = float("-inf")
        self._last_request: object = None

    @contextmanager
    def running(self) -> Iterator[None]:
        request = _request()
        with self._lock:
            self._in_flight[request] = self._in_flight.get(request, 0) + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._in_flight.pop(request) - 1
                if left:
                    self._in_flight[request] = left
                self._last_end = time.monotonic()
                self._last_request = request

    def recent(self, within: float = QUIET_SECONDS) -> bool:
        """Another request's short run is in flight, or ended less than `within` s ago."""
        request = _request()
        with self._lock:
            if any(other is not request for other in self._in_flight):
                return True
            ended_lately = time.monotonic() - self._last_end < within
            return ended_lately and self._last_request is not request


SHORT_RUNS = ShortRuns()
_local = threading.local()


def mark_batch_work() -> None:
    """The current request is batch work: none of its runs count as short."""
    _local.batch_request = _request()


def doing_batch_work() -> bool:
    return getattr(_local, "batch_request", None) is _request()


@contextmanager
def run_kind() -> Iterator[None]:
    """Wrap one session run: counted as short unless this thread's request is batch work."""
    if doing_batch_work():
        yield
        return
    with SHORT_RUNS.running():
        yield
