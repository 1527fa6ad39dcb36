"""Exceptions of the Cell SDK, named after E2B's so migrated code keeps its
``except`` clauses. Each says who is at fault: the caller (bad key, bad
argument, unknown sandbox), the server's capacity (rate limit, busy), or the
network (timeout)."""
from __future__ import annotations

from typing import Any


class SandboxException(Exception):
    """Base class. ``status`` is the HTTP status (0 when no answer came back),
    ``code`` the server's machine code (``"cell_not_found"``, ``"busy"``, ...)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body


class TimeoutException(SandboxException):
    """No answer in time: the request timed out, or the connection failed.

    A code run that was still in flight may or may not have run; the SDK never
    sends it again."""


class AuthenticationException(SandboxException):
    """401/403: missing, wrong or revoked API key, or a Pro feature without a Pro license."""


class NotFoundException(SandboxException):
    """404: no such sandbox (cell), file or receipt."""


class SandboxNotFoundException(NotFoundException):
    """404 for the sandbox itself: it was killed, or it expired."""


class InvalidArgumentException(SandboxException):
    """400/413: the request was refused as malformed (bad template, bad path, body too large)."""


class RateLimitException(SandboxException):
    """429 after the SDK's retries: ``retry_after`` is the server's Retry-After in seconds."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerBusyException(RateLimitException):
    """503 after the SDK's retries: every worker busy, or the node at its cell capacity."""


class CellLostException(SandboxException):
    """409 ``cell_lost``: the worker holding the cell's interpreter was replaced.
    Its variables are gone, its files are kept; the next run starts fresh."""


def from_response(status: int, body: Any, retry_after: float | None) -> SandboxException:
    """Map an HTTP error answer (``{"error", "code"}``) to an exception."""
    message = body.get("error") if isinstance(body, dict) else None
    code = body.get("code") if isinstance(body, dict) else None
    message = str(message or (body if isinstance(body, str) and body else f"HTTP {status}"))
    code = str(code or "")
    kw: dict[str, Any] = {"status": status, "code": code, "body": body}
    if status in (401, 403):
        return AuthenticationException(message, **kw)
    if status == 404:
        cls = SandboxNotFoundException if code == "cell_not_found" else NotFoundException
        return cls(message, **kw)
    if status in (400, 413, 422):
        return InvalidArgumentException(message, **kw)
    if status == 409 and code == "cell_lost":
        return CellLostException(message, **kw)
    if status == 429:
        return RateLimitException(message, retry_after=retry_after, **kw)
    if status == 503:
        return ServerBusyException(message, retry_after=retry_after, **kw)
    if status in (502, 504):
        return TimeoutException(message, **kw)
    return SandboxException(message, **kw)
