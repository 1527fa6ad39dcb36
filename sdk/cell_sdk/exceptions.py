"""Exceptions of the Cell SDK, named after E2B's so migrated code keeps its
``except`` clauses. Each says who is at fault: the caller (bad key, bad
argument, unknown sandbox), the server's capacity (rate limit, busy), or the
network (timeout)."""
from __future__ import annotations

from typing import Any


class SandboxException(Exception):
    """Base class. ``status`` is the HTTP status (0 when no answer came back),
    ``code`` the server's machine code (``"cell_not_found"``, ``"busy"``, ...).
    ``execution`` is the run's ``Execution`` (with its receipt) when the run was
    answered but ended in a way ``run_code`` raises for (a timeout, a kill)."""

    def __init__(self, message: str, *, status: int = 0, code: str = "", body: Any = None,
                 execution: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.body = body
        self.execution = execution

    @property
    def receipt(self) -> dict[str, Any] | None:
        """The receipt of the run this exception ends, if it was answered."""
        return None if self.execution is None else dict(self.execution.receipt)


class TimeoutException(SandboxException):
    """A time limit passed. Either the run hit its own limit (``code``
    ``"run_timeout"``; ``execution`` holds its ``Execution``, output so far and
    receipt, as E2B's ``run_code`` raises it), or no HTTP answer came in time
    (``code`` ``"request_timeout"``): a code run still in flight then may or may
    not have run, and the SDK never sends it again."""


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


class SandboxKilledException(SandboxException):
    """The sandbox was killed (``kill()``, from any client) while this
    ``run_code`` was in flight; the run was stopped at once. ``execution``
    holds it (status ``killed``) and its receipt."""


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
