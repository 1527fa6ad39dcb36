"""Cell client SDK: E2B-style ``Sandbox`` over Cell's HTTP/JSON API.

Standard library only: importing it loads no Flask, wasmtime or Textual, so it
installs anywhere a client runs. ``CELL_API_URL`` and ``CELL_API_KEY`` are the
defaults for ``api_url`` and ``api_key``.
"""
from __future__ import annotations

from cell_sdk._http import ConnectionConfig
from cell_sdk.client import CellClient
from cell_sdk.exceptions import (
    AuthenticationException,
    CellLostException,
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    SandboxException,
    SandboxKilledException,
    SandboxNotFoundException,
    ServerBusyException,
    TimeoutException,
)
from cell_sdk.filesystem import Filesystem
from cell_sdk.models import (
    EntryInfo,
    Execution,
    ExecutionError,
    FileType,
    Logs,
    OutputMessage,
    Result,
    SandboxInfo,
    WriteInfo,
)
from cell_sdk.sandbox import Sandbox

__all__ = [
    "AuthenticationException", "CellClient", "CellLostException", "ConnectionConfig", "EntryInfo", "Execution",
    "ExecutionError", "FileType", "Filesystem", "InvalidArgumentException", "Logs", "NotFoundException",
    "OutputMessage", "RateLimitException", "Result", "Sandbox", "SandboxException", "SandboxInfo", "SandboxKilledException",
    "SandboxNotFoundException", "ServerBusyException", "TimeoutException", "WriteInfo",
]
