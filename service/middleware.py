"""Pure ASGI middleware: the request body limit, enforced before any route reads the body."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLarge


class BodyLimitMiddleware:
    """413 by declared Content-Length at once, and by counting streamed bytes otherwise."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = self._content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await self._reject(send)
            return
        received = 0
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body is larger than {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)

    @staticmethod
    def _content_length(scope: Scope) -> int | None:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return None
        return None

    async def _reject(self, send: Send) -> None:
        body = json.dumps(
            {
                "error": {
                    "code": BodyTooLarge.code,
                    "message": f"request body is larger than {self.max_body_bytes} bytes",
                }
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
