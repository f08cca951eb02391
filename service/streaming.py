"""Long engine work answered as a stream of events: NDJSON lines, or Server-Sent Events.

The work runs in a worker thread like any other (`run_engine`: admission, deadline) and emits
events on the way (progress, ascent steps); the stream ends with one `{"result": ...}` or one
`{"error": {"code", "message"}}` event. A client that goes away stops the work at its next
event. Events per stream are bounded by the emitter (progress is throttled to whole percents).
"""

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from engines.errors import EngineError, Overloaded
from engines.runtime import progress
from service.errors import ServiceError
from service.state import ServiceState
from service.work import run_engine

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
STREAM_MEDIA_TYPES: dict[str, dict[str, Any]] = {NDJSON: {}, SSE: {}}

log = logging.getLogger(__name__)
Result = TypeVar("Result")
Emit = Callable[[dict[str, Any]], None]
# Running works of streams, kept referenced until they finish (asyncio holds tasks weakly).
_tasks: set[asyncio.Task[None]] = set()


class StreamClosed(Exception):
    """The client went away: the work stops at its next event."""


def stream_format(request: Request) -> Literal["ndjson", "sse"]:
    """Server-Sent Events for a client that asks for them, NDJSON otherwise."""
    accept = request.headers.get("accept", "").lower()
    return "sse" if SSE in accept else "ndjson"


def encode_event(event: dict[str, Any], fmt: Literal["ndjson", "sse"]) -> bytes:
    data = json.dumps(event, separators=(",", ":"))
    if fmt == "ndjson":
        return (data + "\n").encode()
    kind = "result" if "result" in event else "error" if "error" in event else "progress"
    return f"event: {kind}\ndata: {data}\n\n".encode()


def progress_emitter(emit: Emit) -> progress.Listener:
    """A progress listener that emits {"done", "total", "stage"} at each new percent."""
    last: list[tuple[str | None, int]] = [(None, -1)]

    def listener(done: int, total: int, stage: str | None) -> None:
        percent = 100 * done // max(total, 1)
        if (stage, percent) == last[0]:
            return
        last[0] = (stage, percent)
        emit({"done": done, "total": total, "stage": stage})

    return listener


def stream_response(
    request: Request,
    state: ServiceState,
    timeout_ms: int | None,
    work: Callable[[Emit], Result],
    answer: Callable[[Result], BaseModel],
) -> StreamingResponse:
    """Run `work(emit)` and stream what it emits, then `answer(result)` as the last event."""
    if state.in_flight >= state.settings.max_in_flight:
        # Refused before the stream opens, so the caller gets a plain 503 with Retry-After.
        raise Overloaded("the service is at capacity; retry shortly")
    fmt = stream_format(request)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    closed = threading.Event()

    def emit(event: dict[str, Any]) -> None:
        if closed.is_set():
            raise StreamClosed
        loop.call_soon_threadsafe(events.put_nowait, event)

    async def produce() -> None:
        try:
            result = await run_engine(state, timeout_ms, lambda: work(emit))
            final: dict[str, Any] = {"result": answer(result).model_dump(mode="json")}
        except StreamClosed:
            return
        except (EngineError, ServiceError) as exc:
            final = {"error": {"code": exc.code, "message": exc.message}}
        except Exception as exc:
            log.error("stream failed", exc_info=exc)
            final = {"error": {"code": "internal_error", "message": "internal error"}}
        await events.put(final)

    async def lines() -> AsyncIterator[bytes]:
        task = asyncio.create_task(produce())
        _tasks.add(task)
        try:
            while True:
                event = await events.get()
                yield encode_event(event, fmt)
                if "result" in event or "error" in event:
                    break
        finally:
            closed.set()
            task.add_done_callback(_tasks.discard)  # runs at once if it is already done

    media_type = SSE if fmt == "sse" else NDJSON
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(lines(), media_type=media_type, headers=headers)
