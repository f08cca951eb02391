"""Progress of long engine work, reported to whoever is listening on the current thread.

A route (or the batch CLI) wraps a call in `reporting(listener)`; any method's batch loop calls
`report(done, total)` after each batch without knowing who, if anyone, listens. Like deadlines,
the listener lives on the worker thread that runs the engine.

Work in several phases (a map, then its deletion and insertion curves) opens a `phase` per
part: the listener then sees one running count over all of them.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[int, int], None]
"""Called with (units done, units in all)."""

_local = threading.local()


@contextmanager
def reporting(listener: Listener) -> Iterator[None]:
    """Send every `report` made on this thread, within the block, to `listener`."""
    previous = getattr(_local, "listener", None)
    _local.listener = listener
    try:
        yield
    finally:
        _local.listener = previous


def report(done: int, total: int) -> None:
    """`done` of `total` units of the current phase are finished."""
    listener: Listener | None = getattr(_local, "listener", None)
    if listener is not None:
        listener(done, total)


@contextmanager
def phases(totals: list[int]) -> Iterator[Callable[[int], None]]:
    """Report several consecutive parts as one count: `start(i)` begins part i.

    Inside part i, `report(done, totals[i])` reaches the outer listener as
    (sum(totals[:i]) + done, sum(totals)).
    """
    outer: Listener | None = getattr(_local, "listener", None)
    offset = [0]
    grand_total = sum(totals)

    def start(index: int) -> None:
        offset[0] = sum(totals[:index])

    if outer is None:
        yield start
        return

    def inner(done: int, total: int) -> None:
        outer(offset[0] + done, grand_total)

    with reporting(inner):
        yield start
