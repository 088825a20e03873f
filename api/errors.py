"""One error shape for every failure: `{"error": ClassName, "detail": ..., "field": ...}`.

Expected failures are `AmidError`s with their own status; request validation errors are 422s
naming the field; a database that cannot be reached is a 503. Nothing reaches the client as a
traceback: an unexpected error is logged here and answered with a bare 500 body.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import AmidError
from core.suggest import unknown_field
from store.db import DatabaseUnavailable

logger = logging.getLogger(__name__)

_SOURCES = {"body", "query", "path", "header", "cookie"}
# A model-level check reports no location; its message starts with the field it is about.
_LEADING_FIELD = re.compile(r"^(?:Value error, )?([A-Za-z_][\w.]*): ")
_NOT_AN_OBJECT = {"model_attributes_type", "model_type", "dict_type"}
_HTTP_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "RequestTooLarge",
    415: "UnsupportedMediaType",
}


class Unauthorized(AmidError):
    status_code = 401


class Forbidden(AmidError):
    status_code = 403


class BodyTooLarge(StarletteHTTPException):
    """Raised while the body is read; FastAPI passes HTTPExceptions through its body parsing."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


def error_body(error: str, detail: str, field: str | None, **extra: Any) -> dict[str, Any]:
    return {"error": error, "detail": detail, "field": field, **extra}


def _field(loc: Sequence[Any], message: str) -> str | None:
    parts = [str(part) for part in loc]
    source = parts[0] if parts and parts[0] in _SOURCES else None
    if source:
        parts = parts[1:]
    # Drop pydantic's internal steps (union members, validator wrappers) from the path.
    parts = [part for part in parts if "[" not in part]
    if parts:
        return ".".join(parts)
    match = _LEADING_FIELD.match(message)
    if match:
        return match.group(1)
    # The body as a whole is at fault (missing, not an object): name it rather than no field.
    return "body" if source == "body" else None


def _describe(err: dict[str, Any]) -> dict[str, Any]:
    message = str(err.get("msg", "")).removeprefix("Value error, ")
    if err.get("type") == "json_invalid":
        # The location is a character offset in the body, not a field.
        position = err.get("ctx", {}).get("error") or message
        return {"field": "body", "message": f"malformed JSON: {position}", "type": "json_invalid"}
    if tuple(err.get("loc", ())) == ("body",):
        # Pydantic's words for these ("Field required", "Input should be a valid dictionary or
        # object to extract fields from") do not say that the whole body is meant.
        if err.get("type") == "missing":
            message = "a JSON object of job settings is required"
        elif err.get("type") in _NOT_AN_OBJECT:
            message = "must be a JSON object of job settings (sent as application/json)"
    if err.get("type") == "extra_forbidden":
        message = _unknown_field(str(err.get("loc", ("",))[-1]))
    return {
        "field": _field(err.get("loc", ()), message),
        "message": message,
        "type": err.get("type"),
    }


def _unknown_field(name: str) -> str:
    # The job body is the one request document with nested fields a user types by hand.
    from api.schemas import JobSubmission

    return unknown_field(name, JobSubmission)


# Starlette types every handler as taking Exception; each is registered for one class only.


def naming_the_field(message: str, field: str | None) -> str:
    """`message` led by its field ("field: reason"), as request validation errors read, unless it
    names the field already (as a word: `teacher` inside a path such as `models/teacher` does
    not count)."""
    if field and not re.search(rf"(?<![\w/.-]){re.escape(field)}(?![\w/-])", message):
        return f"{field}: {message}"
    return message


async def _amid_error(_: Request, raised: Exception) -> JSONResponse:
    exc = cast(AmidError, raised)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status_code == 401 else None
    # The detail names the field, so a message read without `field` (a log line, a table of
    # errors, a client that shows only the detail) still says what was refused.
    body = {**exc.to_dict(), "detail": naming_the_field(exc.message, exc.field)}
    return JSONResponse(body, status_code=exc.status_code, headers=headers)


async def _validation_error(_: Request, raised: Exception) -> JSONResponse:
    exc = cast(RequestValidationError, raised)
    errors = [_describe(err) for err in exc.errors()]
    first = errors[0] if errors else {"field": None, "message": "invalid request"}
    field, message = first["field"], str(first["message"])
    body = error_body("ValidationError", naming_the_field(message, field), field, errors=errors)
    return JSONResponse(body, status_code=422)


async def _http_error(_: Request, raised: Exception) -> JSONResponse:
    exc = cast(StarletteHTTPException, raised)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI answers a body it cannot decode (not UTF-8, nested too deeply) with a bare 400;
        # it is a malformed body like any other, so it gets the documented 422 naming `body`.
        return _malformed_body(exc.__cause__)
    name = _HTTP_NAMES.get(exc.status_code, "HTTPError")
    # A body over the limit while it streams in: the body is at fault, as when it is declared.
    field = "body" if isinstance(exc, BodyTooLarge) else None
    return JSONResponse(
        error_body(name, naming_the_field(str(exc.detail), field), field),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _malformed_body(cause: BaseException) -> JSONResponse:
    if isinstance(cause, UnicodeDecodeError):
        reason = "not UTF-8 text"
    elif isinstance(cause, RecursionError):
        reason = "nested too deeply"
    else:
        reason = type(cause).__name__
    message = f"malformed JSON: {reason}"
    error = {"field": "body", "message": message, "type": "json_invalid"}
    return JSONResponse(
        error_body("ValidationError", naming_the_field(message, "body"), "body", errors=[error]),
        status_code=422,
    )


async def _database_down(_: Request, exc: Exception) -> JSONResponse:
    logger.warning("database unavailable: %s", exc)
    error = DatabaseUnavailable("the job database is unavailable; retry shortly")
    return JSONResponse(error.to_dict(), status_code=503, headers={"Retry-After": "5"})


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return JSONResponse(
        error_body("InternalError", "an unexpected error occurred; it has been logged", None),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AmidError, _amid_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(InterfaceError, _database_down)
    # Every pooled connection busy past AMID_API_QUEUE_SECONDS: overload, answered as a 503.
    app.add_exception_handler(PoolTimeout, _database_down)
    app.add_exception_handler(Exception, _unexpected)
