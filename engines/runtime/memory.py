"""One memory budget for what the models keep resident and what requests hold while they run.

Resident things (a loaded model, each prepared session of it) are entries with a cost in bytes,
kept in least-recently-used order. Work in flight (a batch of noisy or occluded copies and
their activations) reserves bytes for as long as it runs. Making room evicts the least recently
used entries; what cannot fit even then is refused with `OverBudget` (503 with Retry-After).
Graph builds, which need memory and a core while they run, are bounded too (`build_slot`).

Costs are estimates made from the graphs (engines.graphs.sizes), not measurements: the budget
bounds what the process asks for; the interpreter and the libraries come on top of it.
"""

import ctypes
import ctypes.util
import functools
import gc
import itertools
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engines.errors import OverBudget
from engines.runtime.deadline import current_deadline

CGROUP_V2_LIMIT = Path("/sys/fs/cgroup/memory.max")
CGROUP_V1_LIMIT = Path("/sys/fs/cgroup/memory/memory.limit_in_bytes")
CGROUP_SHARE = 0.75
"""Of a container's limit: the rest is the interpreter, libraries, request bodies and images."""
RAM_SHARE = 0.5
"""Of the machine's RAM when no container limit is set: the machine is shared with others."""
# Waiting for a build slot without a request deadline (warm-up, CLI) never gives up sooner.
UNBOUNDED_WAIT_SECONDS = 3600.0


def container_limit_bytes() -> int | None:
    """The cgroup (v2, else v1) memory limit, or None when there is none."""
    for path in (CGROUP_V2_LIMIT, CGROUP_V1_LIMIT):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 reports "no limit" as a huge number
            return int(text)
    return None


def physical_memory_bytes() -> int:
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def default_budget_bytes() -> int:
    limit = container_limit_bytes()
    if limit is not None:
        return int(limit * CGROUP_SHARE)
    return int(physical_memory_bytes() * RAM_SHARE)


def resident_bytes() -> int:
    """The process's resident set size (Linux), 0 where it cannot be read."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def return_freed_memory() -> None:
    """Hand the heap's free pages back to the system (glibc's malloc_trim).

    Evicted sessions free their memory into malloc's arenas, which keep it: resident memory
    would stay at its peak, and a budget that measures it would evict every entry at every
    admission from then on, rebuilding and reloading sessions into an ever more fragmented heap
    (the zoo's 79 models grew a server to 24 GB that way)."""
    gc.collect()  # sessions held in reference cycles are freed here, not when evicted
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)


@dataclass
class _Entry:
    kind: str
    owner: str
    cost: int
    evict: Callable[[], None]


@dataclass(frozen=True)
class BudgetUsage:
    limit_bytes: int
    resident_bytes: int
    """Estimated bytes of every resident entry."""
    reserved_bytes: int
    """Bytes reserved by work in flight."""
    by_kind: dict[str, int]
    entries_by_kind: dict[str, int]
    evictions: dict[str, int]
    builds_in_flight: int


class MemoryBudget:
    """Bytes for resident entries and work in flight, evicting least recently used entries."""

    def __init__(
        self, limit_bytes: int | None = None, max_builds: int = 2, measure_process: bool = False
    ) -> None:
        """`measure_process`: the process's own growth in resident memory since now counts too
        whenever it exceeds the estimates (the service's budget: it is alone in its process)."""
        self.limit_bytes = limit_bytes if limit_bytes else default_budget_bytes()
        if measure_process:
            return_freed_memory()  # from a trimmed heap, so later trims do not undercount
        self._baseline = resident_bytes() if measure_process else None
        self.max_builds = max_builds
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._ids = itertools.count()
        self._reserved = 0
        self._evictions: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._builds = threading.BoundedSemaphore(max_builds)
        self._building = 0
        self.on_build: Callable[[str, float], None] | None = None
        """Hears `(kind, seconds)` after every build (for metrics)."""

    # --- resident entries ----------------------------------------------------------------

    def admit(self, kind: str, owner: str, cost: int, evict: Callable[[], None]) -> int:
        """Count a new resident entry, evicting others to make room; its id for touch/release.

        `evict` drops the owner's reference; it is called without the budget's lock held.
        """
        with self._lock:
            victims = self._make_room(cost, f"a {kind} of {owner}")
            entry_id = next(self._ids)
            self._entries[entry_id] = _Entry(kind, owner, max(0, cost), evict)
        self._run_evictions(victims)
        return entry_id

    def touch(self, entry_id: int) -> None:
        with self._lock:
            if entry_id in self._entries:
                self._entries.move_to_end(entry_id)

    def release(self, entry_id: int) -> None:
        """The owner dropped the entry itself (no eviction callback)."""
        with self._lock:
            self._entries.pop(entry_id, None)

    def release_owner(self, owner: str) -> None:
        with self._lock:
            for entry_id in [i for i, e in self._entries.items() if e.owner == owner]:
                del self._entries[entry_id]

    def evict_kind(self, kind: str, owner: str | None = None) -> int:
        """Evict every entry of `kind` (of `owner`); how many were evicted."""
        with self._lock:
            chosen = [
                i
                for i, e in self._entries.items()
                if e.kind == kind and (owner is None or e.owner == owner)
            ]
            victims = [self._pop(i) for i in chosen]
        self._run_evictions(victims)
        return len(victims)

    # --- work in flight ------------------------------------------------------------------

    @contextmanager
    def reserve(self, nbytes: int, what: str) -> Iterator[None]:
        """Hold `nbytes` for the duration of a piece of work, evicting entries to make room."""
        with self._lock:
            victims = self._make_room(nbytes, what)
            self._reserved += nbytes
        self._run_evictions(victims)
        try:
            yield
        finally:
            with self._lock:
                self._reserved -= nbytes

    def available_for_work(self) -> int:
        """Bytes a reservation could get now, counting what eviction would free."""
        with self._lock:
            return max(0, self.limit_bytes - self._reserved)

    # --- builds --------------------------------------------------------------------------

    @contextmanager
    def build_slot(self, kind: str) -> Iterator[None]:
        """One of `max_builds` slots for building a graph, waited for within the deadline."""
        deadline = current_deadline()
        wait = UNBOUNDED_WAIT_SECONDS if deadline is None else max(0.0, deadline.remaining())
        if not self._builds.acquire(timeout=wait):
            raise OverBudget(
                f"{self.max_builds} graph builds are running; this request's {kind} graph "
                "could not start before its deadline"
            )
        with self._lock:
            self._building += 1
        started = time.perf_counter()
        try:
            yield
        finally:
            with self._lock:
                self._building -= 1
            self._builds.release()
            if self.on_build is not None:
                self.on_build(kind, time.perf_counter() - started)

    # --- reading -------------------------------------------------------------------------

    def usage(self) -> BudgetUsage:
        with self._lock:
            by_kind: Counter[str] = Counter()
            counts: Counter[str] = Counter()
            for entry in self._entries.values():
                by_kind[entry.kind] += entry.cost
                counts[entry.kind] += 1
            return BudgetUsage(
                limit_bytes=self.limit_bytes,
                resident_bytes=sum(by_kind.values()),
                reserved_bytes=self._reserved,
                by_kind=dict(by_kind),
                entries_by_kind=dict(counts),
                evictions=dict(self._evictions),
                builds_in_flight=self._building,
            )

    def used_bytes(self) -> int:
        """What `admit` and `reserve` count as used (estimates, or the measured growth)."""
        with self._lock:
            return self._used()

    # --- inside the lock -----------------------------------------------------------------

    def _used(self) -> int:
        """The estimates' total, or the process's measured growth where that is larger: the
        estimates come from the graphs, and onnxruntime's sessions can hold twice as much."""
        estimated = self._reserved + sum(e.cost for e in self._entries.values())
        if self._baseline is None:
            return estimated
        return max(estimated, resident_bytes() - self._baseline)

    def _pop(self, entry_id: int) -> _Entry:
        entry = self._entries.pop(entry_id)
        self._evictions[entry.kind] += 1
        return entry

    def _make_room(self, nbytes: int, what: str) -> list[_Entry]:
        if nbytes > self.limit_bytes - self._reserved:
            raise OverBudget(
                f"{what} needs ~{nbytes >> 20} MiB; the memory budget has "
                f"{max(0, self.limit_bytes - self._reserved) >> 20} MiB free of "
                f"{self.limit_bytes >> 20} MiB while other work runs"
            )
        victims: list[_Entry] = []
        used = self._used()
        while used + nbytes > self.limit_bytes and self._entries:
            oldest = next(iter(self._entries))
            victim = self._pop(oldest)
            used -= victim.cost
            victims.append(victim)
        return victims

    @staticmethod
    def _run_evictions(victims: list[_Entry]) -> None:
        for victim in victims:
            victim.evict()
        if victims:
            return_freed_memory()
