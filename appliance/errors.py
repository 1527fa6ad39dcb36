"""Errors that cross the HTTP boundary.

Each class carries its HTTP status and a machine-readable code; one handler in
``appliance.web.errors`` renders every one of them as ``{"error", "code"}``.
A guest that traps, times out or runs out of memory is *not* an error: it is a
run result with a receipt.
"""
from __future__ import annotations


class CellError(Exception):
    """Base class: the request failed, and the client is told why."""

    status: int = 500
    code: str = "internal"

    def __init__(self, message: str, *, code: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def with_status(self, status: int) -> "CellError":
        """Carry a status decided elsewhere (e.g. by a worker) across the boundary."""
        self.status = status if 400 <= status <= 599 else 500
        return self


class BadRequest(CellError):
    status = 400
    code = "bad_request"


class Unauthorized(CellError):
    status = 401
    code = "unauthorized"


class Forbidden(CellError):
    status = 403
    code = "forbidden"


class NotFound(CellError):
    status = 404
    code = "not_found"


class Conflict(CellError):
    status = 409
    code = "conflict"


class PayloadTooLarge(CellError):
    status = 413
    code = "payload_too_large"


class RateLimited(CellError):
    status = 429
    code = "rate_limited"


class Busy(CellError):
    status = 503
    code = "busy"


class ConfigError(Exception):
    """Bad configuration: start-up stops with a message that names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"config {key}: {message}")
        self.key = key
