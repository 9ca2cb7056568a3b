"""Plain ASGI middlewares for the HTTP server: a body-size cap, an API-key check, and a catch-all that turns an
unexpected exception into a 500 without dropping the connection. Plain ASGI rather than Starlette's
BaseHTTPMiddleware, which would hide a client's disconnect from the routes.
"""

from __future__ import annotations

import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from runtime.openai_protocol import ApiError, internal_error


class BodyLimit:
    """Refuse bodies over `limit` bytes with 413, counting what arrives (Content-Length may be absent or lie).
    The body is read here whole, then handed on; later reads go to the client (to see a disconnect)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, send)
        body, more = bytearray(), True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await self._refuse(scope, send)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, send: Send) -> None:
        error = ApiError(413, f"the request body is larger than {self.limit} bytes", code="request_too_large")
        await error.response()(scope, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


class ApiKeyGuard:
    """Every route but /health needs `Authorization: Bearer KEY` (/metrics and the schema too)."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(401, "invalid or missing API key", code="invalid_api_key")
                return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class CatchAll:
    """The last line of defence: an unexpected exception becomes a 500 in OpenAI's shape, and the connection
    stays open (Starlette's own handler re-raises, which makes the server drop keep-alive connections)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as e:
            if scope["type"] == "http" and not started:
                await internal_error(e).response()(scope, receive, send)
