"""Per-request deadlines that reach into onnxruntime.

The route activates a `Deadline` in the worker thread that runs the engine; every session run
on that thread checks it first and registers its `RunOptions` with one watchdog thread, which
sets `terminate` when the deadline passes, so a cancelled request stops burning CPU.
"""

import heapq
import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime as ort

from engines.errors import DeadlineExceeded

_local = threading.local()


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires_at = time.monotonic() + seconds

    def remaining(self) -> float:
        return self.expires_at - time.monotonic()

    def check(self) -> None:
        if self.remaining() <= 0:
            raise DeadlineExceeded(f"the request ran past its deadline of {self.seconds:g} s")

    @contextmanager
    def activate(self) -> Iterator["Deadline"]:
        """Make this the deadline of every engine call on the current thread."""
        previous = getattr(_local, "deadline", None)
        _local.deadline = self
        try:
            yield self
        finally:
            _local.deadline = previous


def current_deadline() -> Deadline | None:
    found: Deadline | None = getattr(_local, "deadline", None)
    return found


class _Watchdog:
    """Terminates registered runs whose deadline has passed."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, ort.RunOptions]] = []
        self._counter = itertools.count()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def watch(self, expires_at: float, options: ort.RunOptions) -> None:
        with self._condition:
            heapq.heappush(self._heap, (expires_at, next(self._counter), options))
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="deadlines", daemon=True)
                self._thread.start()
            self._condition.notify()

    def _loop(self) -> None:
        with self._condition:
            while True:
                if not self._heap:
                    self._condition.wait()
                    continue
                expires_at, _, options = self._heap[0]
                delay = expires_at - time.monotonic()
                if delay > 0:
                    self._condition.wait(timeout=delay)
                    continue
                heapq.heappop(self._heap)
                options.terminate = True


_watchdog = _Watchdog()


@contextmanager
def guarded_run(release_memory: bool = False) -> Iterator[ort.RunOptions | None]:
    """RunOptions for one session run under the thread's deadline (None when there is none
    and nothing else is asked). `release_memory`: the CPU arena gives back what the run grew
    it by (a batch's activations would otherwise stay with the arena for good)."""
    deadline = current_deadline()
    unbounded = deadline is None or deadline.seconds == float("inf")
    if unbounded and not release_memory:
        yield None
        return
    options = ort.RunOptions()
    if release_memory:
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    if deadline is None or unbounded:
        yield options
        return
    deadline.check()
    _watchdog.watch(deadline.expires_at, options)
    try:
        yield options
    except Exception:
        if options.terminate or deadline.remaining() <= 0:
            raise DeadlineExceeded(
                f"the request ran past its deadline of {deadline.seconds:g} s"
            ) from None
        raise
