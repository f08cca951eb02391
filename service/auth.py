"""Optional API keys: with `api_keys` set, every path but the public ones needs `X-API-Key`.

Deny by default: a route added later is protected without anyone remembering to. Public: the
health probes, `/metrics` (scrape it from inside the network), and the web page with its static
files, which hold no data (the page's API calls need a key like any other client's).
"""

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from service.errors import ServiceError, error_response

API_KEY_HEADER = "X-API-Key"
_API_KEY_KEY = API_KEY_HEADER.lower().encode("latin-1")
PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})
PUBLIC_PREFIXES = ("/static/",)


class Unauthorized(ServiceError):
    status_code = 401
    code = "unauthorized"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def key_matches(given: bytes, keys: tuple[bytes, ...]) -> bool:
    """Compared with every key, in constant time each, whatever matched before."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: list[str]) -> None:
        self.app = app
        self.keys = tuple(key.encode("ascii") for key in api_keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or is_public(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope.get("headers", []) if k == _API_KEY_KEY), None)
        if given is not None and key_matches(given, self.keys):
            await self.app(scope, receive, send)
            return
        message = f"a valid {API_KEY_HEADER} header is required"
        if given is not None:
            message = f"the {API_KEY_HEADER} header holds no valid key"
        response = error_response(Unauthorized.status_code, Unauthorized.code, message)
        await response(scope, receive, send)
