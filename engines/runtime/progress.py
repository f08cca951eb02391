"""Progress of long engine work, reported to whoever is listening on the current thread.

A route (or the batch CLI) wraps a call in `reporting(listener)`; any method's batch loop calls
`report(done, total)` after each batch without knowing who, if anyone, listens. Like deadlines,
the listener lives on the worker thread that runs the engine.

Work in several parts (a map, then its deletion and insertion curves) names each part with
`stage`; the listener gets the name with each report, and each part counts from zero.
"""

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Listener = Callable[[int, int, str | None], None]
"""Called with (units done, units in the stage, the stage's name)."""

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
    """`done` of `total` units of the current stage are finished."""
    listener: Listener | None = getattr(_local, "listener", None)
    if listener is not None:
        listener(done, total, getattr(_local, "stage", None))


def listening() -> bool:
    return getattr(_local, "listener", None) is not None


def rows_per_report(rows: int, total: int, reports: int = 25) -> int:
    """At most `rows` per run, and fewer while someone listens, so that `total` rows give
    about `reports` reports (a listener wants progress every few percent)."""
    if not listening():
        return rows
    return max(1, min(rows, total // reports))


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Reports within the block belong to the part of the work called `name`."""
    previous = getattr(_local, "stage", None)
    _local.stage = name
    try:
        yield
    finally:
        _local.stage = previous
