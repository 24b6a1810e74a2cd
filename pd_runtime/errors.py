"""One exception tree for pd-runtime, and its translation into the OpenAI error shape.

    PDRuntimeError
     ├── ConfigError            bad YAML / flags; names the offending field
     ├── LaunchError            a part failed to start or died during start-up
     └── ServingError           anything that ends an HTTP request with an error
          ├── BadRequestError         400 (client's fault: body, headers)
          ├── AuthenticationError     401 (missing or wrong API key)
          ├── ForbiddenError          403 (e.g. sidecar asked to relay to an untrusted host)
          ├── NotFoundError           404 (unknown model, unknown path)
          ├── MethodNotAllowedError   405 (known path, wrong method)
          ├── PayloadTooLargeError    413 (request body over the configured limit)
          ├── RateLimitError          429 (admission queue full, displaced or timed out)
          ├── ClientGone              499 (the client left before the response started)
          ├── NoEndpointError         503 (no healthy endpoint to route to)
          └── UpstreamError           502 / 504 (a worker failed, hung or went away)

Lower-level errors (httpx, ZMQ, vLLM) are caught at the component boundary and re-raised as the most
specific of these, chained with ``from``, so the HTTP edge only has to know this tree.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

__all__ = [
    "AuthenticationError",
    "BadRequestError",
    "ClientGone",
    "ConfigError",
    "ForbiddenError",
    "LaunchError",
    "MethodNotAllowedError",
    "NoEndpointError",
    "NotFoundError",
    "PDRuntimeError",
    "PayloadTooLargeError",
    "RateLimitError",
    "ServingError",
    "UpstreamError",
    "openai_error_body",
]


class PDRuntimeError(Exception):
    """Base of every error pd-runtime raises on purpose."""


class ConfigError(PDRuntimeError):
    """The configuration is invalid; the message names the field (e.g. ``decode.replicas``)."""


class LaunchError(PDRuntimeError):
    """A deployment part could not be started or died before it became healthy."""


class ServingError(PDRuntimeError):
    """An error that ends one HTTP request; carries the status and OpenAI error ``type``.

    ``type`` follows vLLM (the class name of the matching ``openai`` client exception), and
    ``headers`` are extra response headers (``Retry-After``, ``WWW-Authenticate``, ``Allow``).
    """

    status_code: int = int(HTTPStatus.INTERNAL_SERVER_ERROR)
    error_type: str = "InternalServerError"

    def __init__(
        self, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def to_body(self) -> dict[str, Any]:
        return openai_error_body(self.message, self.error_type, self.status_code, self.param)


class BadRequestError(ServingError):
    status_code = int(HTTPStatus.BAD_REQUEST)
    error_type = "BadRequestError"


class AuthenticationError(ServingError):
    status_code = int(HTTPStatus.UNAUTHORIZED)
    error_type = "AuthenticationError"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": "Bearer"})


class ForbiddenError(ServingError):
    status_code = int(HTTPStatus.FORBIDDEN)
    error_type = "PermissionDeniedError"


class NotFoundError(ServingError):
    status_code = int(HTTPStatus.NOT_FOUND)
    error_type = "NotFoundError"


class MethodNotAllowedError(ServingError):
    status_code = int(HTTPStatus.METHOD_NOT_ALLOWED)
    error_type = "MethodNotAllowedError"

    def __init__(self, message: str, *, allowed: list[str]) -> None:
        super().__init__(message, headers={"Allow": ", ".join(sorted(allowed))})


class PayloadTooLargeError(ServingError):
    status_code = int(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    error_type = "PayloadTooLargeError"


class RateLimitError(ServingError):
    """The coordinator is at capacity; ``reason`` is ``queue_full``, ``displaced`` (a request of
    higher priority took the queue slot) or ``queue_timeout``."""

    status_code = int(HTTPStatus.TOO_MANY_REQUESTS)
    error_type = "RateLimitError"

    def __init__(self, message: str, *, reason: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)})
        self.reason = reason


class NoEndpointError(ServingError):
    status_code = int(HTTPStatus.SERVICE_UNAVAILABLE)
    error_type = "ServiceUnavailableError"


class ClientGone(ServingError):
    """The client went away before the response started (nginx's 499); nobody reads the answer,
    it only labels metrics and logs."""

    status_code = 499
    error_type = "ClientClosedRequest"


class UpstreamError(ServingError):
    status_code = int(HTTPStatus.BAD_GATEWAY)
    error_type = "BadGatewayError"

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code


def openai_error_body(
    message: str, error_type: str, code: int, param: str | None = None
) -> dict[str, Any]:
    """The JSON body vLLM and OpenAI return on errors, so clients parse ours the same way."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": int(code)}}
