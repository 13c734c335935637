"""Every failure as an OpenAI-shaped JSON error, and a connection that stays usable after it.

    {"error": {"message": "...", "type": "invalid_request_error", "code": "...", "param": null}}

`ApiError` is raised for what a request got wrong. `failure_response` turns what else can go wrong
into the right status: a full disk is 507 (the write was not kept; nothing changed), any other
failure a 500 that says what happened. `LastResort`, outermost of the app's middleware, answers
for any exception that got that far before its response began, so no request ever gets
Starlette's plain-text 500 (whose exception then makes uvicorn drop the connection under the
client's next request). A response that does close its connection says `Connection: close`.
"""

from __future__ import annotations

import errno
import json
import logging
import sqlite3

from fastapi import HTTPException
from fastapi.responses import JSONResponse

logger = logging.getLogger("latentmem.server")
CLOSE = {"Connection": "close"}  # for answers sent before the body was read: the rest of it is not wanted
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SQLITE_FULL = 13  # sqlite3.Error.sqlite_errorcode of "database or disk is full"


class ApiError(HTTPException):
    def __init__(
        self, status: int, message: str, code: str = "invalid_request", param: str | None = None, headers=None
    ):
        super().__init__(status, message, headers)
        self.code, self.param = code, param


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(status)
    kind = kind or ("invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "code": code, "param": param}}


def error_response(status: int, message: str, code: str, param: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def failure_response(err: BaseException) -> JSONResponse:
    """The answer to an unexpected exception: 507 for a full disk, else 500 (logged with its traceback)."""
    if _disk_full(err):
        logger.error("disk full: %s", err)
        message = "the server's disk is full: nothing was saved and the memory is unchanged; retry later"
        return error_response(507, message, "insufficient_storage")
    logger.error("request failed", exc_info=err)
    return error_response(500, f"internal error ({type(err).__name__}); the memory is unchanged", "internal_error")


def _disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in DISK_FULL
    return isinstance(err, sqlite3.Error) and getattr(err, "sqlite_errorcode", None) == SQLITE_FULL


class LastResort:
    """ASGI middleware: an exception raised before the response started becomes a JSON error."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as err:
            if started:  # half a response is out: only closing the connection can end it
                raise
            await failure_response(err)(scope, receive, send)


async def send_error(send, status: int, message: str, code: str, headers: dict | None = None) -> None:
    """An error from ASGI middleware, which runs outside FastAPI's exception handlers."""
    body = json.dumps(error_body(status, message, code)).encode()
    extra = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})
