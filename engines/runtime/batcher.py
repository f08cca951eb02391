"""Cross-request dynamic batching, for engine code that runs in worker threads.

Callers block in `submit`; one dispatcher thread per batcher gathers what arrives within a short
window from the oldest waiting caller's arrival (up to a row budget), runs it as one onnxruntime
call, and hands each caller its rows.
The queue is bounded: when it is full `submit` fails at once with `Overloaded`. Items are served
in arrival order, so a large job that submits one chunk at a time (occlusion) interleaves fairly
with small requests instead of starving them.
"""

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from engines.errors import DeadlineExceeded, Overloaded
from engines.runtime.deadline import Deadline, current_deadline

Item = TypeVar("Item")
Result = TypeVar("Result")


# What a policy leaves to the provider. On CPU, onnxruntime's throughput peaks at small
# batches (EfficientNet-Lite0 Grad-CAM, 1 thread: ~185 img/s at 1-4 rows, 143 at 32, whose
# activations no longer fit the cache), and batches form by themselves from the requests that
# queue while a run is busy, so no request waits for company. A GPU runs a batch of 32 in
# little more time than one image, so it gathers large batches for a few milliseconds.
AUTO_MAX_ROWS = {"CPUExecutionProvider": 4}
AUTO_MAX_ROWS_OTHERWISE = 32
AUTO_WINDOW_SECONDS = {"CPUExecutionProvider": 0.0}
AUTO_WINDOW_SECONDS_OTHERWISE = 0.005


@dataclass(frozen=True)
class BatchPolicy:
    window_seconds: float | None = 0.005
    """How long a batch waits for more callers, from the oldest one's arrival; None: by
    provider (`for_provider`)."""
    max_rows: int = 32
    """0: by provider."""
    max_queued: int = 64

    def for_provider(self, provider: str) -> "BatchPolicy":
        rows = self.max_rows or AUTO_MAX_ROWS.get(provider, AUTO_MAX_ROWS_OTHERWISE)
        window = self.window_seconds
        if window is None:
            window = AUTO_WINDOW_SECONDS.get(provider, AUTO_WINDOW_SECONDS_OTHERWISE)
        return dataclasses.replace(self, max_rows=rows, window_seconds=window)


@dataclass(eq=False)
class _Pending(Generic[Item, Result]):
    item: Item
    rows: int
    future: "Future[Result]"
    deadline: Deadline | None
    queued_at: float


def _latest_deadline(batch: Sequence[_Pending[Item, Result]]) -> Deadline:
    """A run shared by several callers is terminated only once all of them have given up."""
    if any(p.deadline is None for p in batch):
        return Deadline(float("inf"))
    latest = max(batch, key=lambda p: p.deadline.expires_at if p.deadline else 0.0)
    assert latest.deadline is not None
    return latest.deadline


IDLE_EXIT_SECONDS = 2.0


class MicroBatcher(Generic[Item, Result]):
    def __init__(
        self,
        name: str,
        run_batch: Callable[[Sequence[Item]], Sequence[Result]],
        policy: BatchPolicy,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        """`run_batch` runs items together and returns one result per item, in order.

        `on_batch(rows, queued)` is told each batch's size and the queue depth (for metrics).
        """
        self.name = name
        self._run_batch = run_batch
        self._policy = policy
        self._on_batch = on_batch
        self._queue: deque[_Pending[Item, Result]] = deque()
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, item: Item, rows: int = 1) -> Result:
        deadline = current_deadline()
        if deadline is not None:
            deadline.check()
        pending: _Pending[Item, Result] = _Pending(item, rows, Future(), deadline, time.monotonic())
        with self._condition:
            if len(self._queue) >= self._policy.max_queued:
                raise Overloaded(f"the {self.name} queue is full; retry shortly")
            self._queue.append(pending)
            self._ensure_thread()
            self._condition.notify()
        timeout = None if deadline is None else max(deadline.remaining(), 0.0) + 1.0
        try:
            return pending.future.result(timeout=timeout)
        except TimeoutError:
            pending.future.cancel()
            raise DeadlineExceeded("the request ran past its deadline while queued") from None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._loop, name=f"batcher-{self.name}", daemon=True
            )
            self._thread.start()

    def _take_batch(self) -> list[_Pending[Item, Result]] | None:
        """The next batch, or None when none came for IDLE_EXIT_SECONDS: the thread then ends
        (`submit` starts another), so an idle batcher holds no thread, and the thread no
        reference to what `run_batch` reads (an evicted model's graphs and sessions)."""
        with self._condition:
            while not self._queue:
                if not self._condition.wait(timeout=IDLE_EXIT_SECONDS) and not self._queue:
                    self._thread = None
                    return None
            # The window runs from the oldest caller's arrival: what queued up while the last
            # batch ran has waited long enough and goes at once, keeping the session busy.
            closes = self._queue[0].queued_at + (self._policy.window_seconds or 0.0)
            while True:
                rows = sum(p.rows for p in self._queue)
                left = closes - time.monotonic()
                if rows >= self._policy.max_rows or left <= 0:
                    break
                self._condition.wait(timeout=left)
            batch: list[_Pending[Item, Result]] = []
            rows = 0
            while self._queue and (
                not batch or rows + self._queue[0].rows <= self._policy.max_rows
            ):
                pending = self._queue.popleft()
                rows += pending.rows
                batch.append(pending)
            return batch

    def _loop(self) -> None:
        while True:
            taken = self._take_batch()
            if taken is None:
                return
            batch = [p for p in taken if p.future.set_running_or_notify_cancel()]
            live: list[_Pending[Item, Result]] = []
            for pending in batch:
                if pending.deadline is None or pending.deadline.remaining() > 0:
                    live.append(pending)
                else:
                    pending.future.set_exception(
                        DeadlineExceeded("the request ran past its deadline while queued")
                    )
            if not live:
                continue
            if self._on_batch is not None:
                self._on_batch(sum(p.rows for p in live), len(self._queue))
            try:
                with _latest_deadline(live).activate():
                    results = self._run_batch([p.item for p in live])
            except BaseException as exc:  # each caller gets the failure of its batch
                for pending in live:
                    pending.future.set_exception(exc)
                continue
            for pending, result in zip(live, results, strict=True):
                pending.future.set_result(result)
