"""Running engine work off the event loop: admission, the per-request deadline, threads."""

from collections.abc import Callable
from typing import TypeVar

import anyio

from engines.errors import Overloaded
from engines.models.loaded import LoadedModel
from engines.runtime.deadline import Deadline
from service.state import ServiceState

Result = TypeVar("Result")


async def run_engine(
    state: ServiceState, timeout_ms: int | None, work: Callable[[], Result]
) -> Result:
    """Run `work` in a worker thread under the request's deadline.

    Requests beyond `max_in_flight` are refused at once (503 with Retry-After) rather than
    queued without bound.
    """
    settings = state.settings
    if state.in_flight >= settings.max_in_flight:
        raise Overloaded("the service is at capacity; retry shortly")
    seconds = settings.request_timeout_seconds
    if timeout_ms is not None:
        seconds = min(seconds, timeout_ms / 1000)
    deadline = Deadline(seconds)

    def guarded() -> Result:
        with deadline.activate():
            deadline.check()
            return work()

    state.in_flight += 1
    try:
        return await anyio.to_thread.run_sync(guarded, limiter=state.inference_limiter)
    finally:
        state.in_flight -= 1


async def loaded_model(state: ServiceState, name: str) -> LoadedModel:
    """The model `name`, loaded first (off the event loop) if it is not in memory."""
    entry = state.repository.entry(name)  # 404 at once for an unknown name
    if entry.model is not None:
        return state.repository.get(name)
    return await anyio.to_thread.run_sync(state.repository.get, name)
