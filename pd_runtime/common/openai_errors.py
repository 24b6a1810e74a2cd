"""Errors at the HTTP edge in the OpenAI/vLLM JSON shape: our :class:`~pd_runtime.errors.ServingError`
tree, Starlette's and FastAPI's own errors, and anything unexpected (logged with its traceback).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from pd_runtime.errors import BadRequestError, ServingError, openai_error_body

__all__ = [
    "error_response",
    "install_error_handlers",
]


def error_response(exc: ServingError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=exc.headers or None)


# OpenAI error ``type`` for statuses that Starlette/FastAPI raise on their own.
_TYPE_BY_STATUS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "PayloadTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}


def install_error_handlers(app: FastAPI, component: str) -> None:
    """Whatever escapes a handler still reaches the client in the OpenAI error shape, and is logged
    with its traceback, rather than as a plain-text 500."""
    component_logger = logging.getLogger(f"pd_runtime.{component}")

    async def serving_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ServingError)
        return error_response(exc)

    async def unexpected(request: Request, exc: Exception) -> Response:
        component_logger.exception("unexpected error on %s %s", request.method, request.url.path)
        error = ServingError(f"internal error in the {component}: {type(exc).__name__}")
        return error_response(error)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        kind = _TYPE_BY_STATUS.get(exc.status_code, "InternalServerError")
        body = openai_error_body(str(exc.detail), kind, exc.status_code)
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def invalid_request(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(BadRequestError(f"invalid request: {exc.errors()}"))

    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, unexpected)
