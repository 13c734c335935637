"""Authentication and body-size limits, checked before anything reads a request body.

A pure ASGI middleware: a `/v1/` request without a valid bearer key gets 401 (even if its body is
malformed), one with a declared or streamed body over the limit gets 413. The authenticated user
is left in the ASGI scope under `USER_KEY`. Errors take OpenAI's shape: {"error": {"message",
"type", "code", "param"}}.
"""

from __future__ import annotations

import json

from fastapi import HTTPException

from .auth import KeyTable

USER_KEY = "latentmem.user"


class ApiError(HTTPException):
    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(status, message)
        self.code, self.param = code, param


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


class Guard:
    def __init__(self, app, keys: KeyTable, max_body_bytes: int, max_import_bytes: int):
        self.app, self.keys = app, keys
        self.max_body_bytes, self.max_import_bytes = max_body_bytes, max_import_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = {name.lower(): value.decode("latin-1") for name, value in scope["headers"]}
        scheme, _, key = headers.get(b"authorization", "").partition(" ")
        user = self.keys.user(key.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            message = "missing or invalid API key (send Authorization: Bearer KEY)"
            return await _send_error(send, 401, message, "invalid_api_key", [(b"www-authenticate", b"Bearer")])
        limit = self.max_import_bytes if scope["path"] == "/v1/memory/import" else self.max_body_bytes
        too_large = f"request body over the {limit}-byte limit"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await _send_error(send, 413, too_large, "body_too_large")
        scope[USER_KEY] = user
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # a chunked body that grows past the limit
                raise ApiError(413, too_large, "body_too_large")
            return message

        await self.app(scope, limited_receive, send)


async def _send_error(send, status: int, message: str, code: str, headers=()) -> None:
    body = json.dumps(error_body(status, message, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
