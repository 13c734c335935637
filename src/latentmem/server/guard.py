"""Authentication, body-size limits and a body deadline, checked before anything reads a request body.

A pure ASGI middleware: a `/v1/` request without a valid bearer key gets 401 (even if its body is
malformed), one with a declared or streamed body over the limit gets 413, and one whose body has
not fully arrived `body_timeout` seconds after the request began gets 408: a client sending its
body a byte a second cannot hold a connection forever. Both close the connection (the rest of the
body is not wanted) and say so. The authenticated user is left in the ASGI scope under `USER_KEY`.
"""

from __future__ import annotations

import asyncio

from .auth import KeyTable
from .errors import CLOSE, ApiError, send_error

USER_KEY = "latentmem.user"
# An oversized body up to this many times the limit is read and discarded before the 413 (larger
# ones are refused at once: reading them would cost more than the client's lost response).
DRAIN_FACTOR = 16


class Guard:
    def __init__(self, app, keys: KeyTable, max_body_bytes: int, max_import_bytes: int, body_timeout: float):
        self.app, self.keys = app, keys
        self.max_body_bytes, self.max_import_bytes, self.body_timeout = max_body_bytes, max_import_bytes, body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {name.lower(): value.decode("latin-1") for name, value in scope["headers"]}
        scheme, _, key = headers.get(b"authorization", "").partition(" ")
        user = self.keys.user(key.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            message = "missing or invalid API key (send Authorization: Bearer KEY)"
            return await send_error(send, 401, message, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
        limit = self.max_import_bytes if scope["path"] == "/v1/memory/import" else self.max_body_bytes
        too_large = f"request body over the {limit}-byte limit"
        length = headers.get(b"content-length")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        if length is not None and (not length.isdigit() or int(length) > limit):
            if length.isdigit() and int(length) <= DRAIN_FACTOR * limit:
                # Read the rest first: closing on a client still sending makes its TCP stack reset the
                # connection, and the client never sees the 413 (seen under load).
                await self._drain(receive, deadline)
            return await send_error(send, 413, too_large, "body_too_large", CLOSE)
        scope[USER_KEY] = user
        received, complete = 0, False

        async def guarded_receive():
            nonlocal received, complete
            if complete:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                message = f"request body not received within {self.body_timeout:g} s"
                raise ApiError(408, message, "body_timeout", headers=CLOSE) from None
            received += len(message.get("body", b""))
            complete = not message.get("more_body", False)
            if received > limit:  # a chunked body that grows past the limit
                raise ApiError(413, too_large, "body_too_large", headers=CLOSE)
            return message

        await self.app(scope, guarded_receive, send)

    @staticmethod
    async def _drain(receive, deadline: float) -> None:
        """Receive and discard a request body until it ends, the client leaves or the deadline passes."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
