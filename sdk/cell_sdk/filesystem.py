"""``sandbox.files``: E2B's filesystem methods over the cell's volume.

Paths are relative to the volume, which guests see at ``/data``; ``/data/x``
and ``x`` name the same file. Anything outside is refused by the server (400).
"""
from __future__ import annotations

import base64
from typing import IO, TYPE_CHECKING, Any, Literal

from cell_sdk.exceptions import InvalidArgumentException, NotFoundException
from cell_sdk.models import EntryInfo, FileType, WriteInfo, entry_from_wire

if TYPE_CHECKING:
    from cell_sdk.sandbox import Sandbox


def _volume_path(path: str) -> str:
    if path in ("/", "/data", "/data/", ".", "./"):
        return ""
    return path


class Filesystem:
    def __init__(self, sandbox: Sandbox) -> None:
        self._sbx = sandbox

    def _base(self) -> str:
        return f"/v1/cells/{self._sbx.sandbox_id}/files"

    def _get(self, suffix: str, path: str, request_timeout: float | None, **extra: str) -> Any:
        query = {"path": _volume_path(path), **extra}
        return self._sbx._http.request("GET", self._base() + suffix, query=query, timeout=request_timeout)

    def read(self, path: str, format: Literal["text", "bytes", "stream"] = "text", request_timeout: float | None = None) -> Any:
        """The file's content: ``str`` (format ``"text"``), ``bytes``, or an iterator of bytes (``"stream"``)."""
        if format not in ("text", "bytes", "stream"):
            raise InvalidArgumentException(f"format must be text or bytes, not {format!r}", code="invalid_field")
        data = self._get("", path, request_timeout, **({"encoding": "base64"} if format != "text" else {}))
        content = str(data.get("content", ""))
        raw = base64.b64decode(content) if data.get("encoding") == "base64" else content.encode("utf-8")
        if format == "text":
            return raw.decode("utf-8", "replace") if data.get("encoding") == "base64" else content
        if format == "stream":
            return iter([raw])
        return raw

    def write(self, path: str, data: str | bytes | IO[Any], request_timeout: float | None = None) -> WriteInfo:
        """Create or replace a file (parent directories are made)."""
        if hasattr(data, "read"):
            data = data.read()
        if isinstance(data, str):
            body: dict[str, Any] = {"path": _volume_path(path), "content": data}
        elif isinstance(data, (bytes, bytearray, memoryview)):
            body = {"path": _volume_path(path), "content": base64.b64encode(bytes(data)).decode("ascii"), "encoding": "base64"}
        else:
            raise InvalidArgumentException("data must be str, bytes or a readable file", code="invalid_field")
        entry = entry_from_wire(self._sbx._http.request("POST", self._base(), body=body, timeout=request_timeout))
        return WriteInfo(name=entry.name, type=entry.type, path=entry.path)

    def write_files(self, files: list[dict[str, Any]], request_timeout: float | None = None) -> list[WriteInfo]:
        """E2B's ``write_files``: each item ``{"path", "data"}``."""
        return [self.write(f["path"], f["data"], request_timeout) for f in files]

    def list(self, path: str = "", depth: int = 1, request_timeout: float | None = None) -> list[EntryInfo]:
        """Entries of a directory; ``depth`` > 1 walks into subdirectories."""
        if depth < 1:
            raise InvalidArgumentException("depth must be at least 1", code="invalid_field")
        entries = [entry_from_wire(e) for e in self._get("/list", path, request_timeout).get("files", [])]
        if depth > 1:
            for entry in list(entries):
                if entry.type == FileType.DIR:
                    entries.extend(self.list(entry.path, depth - 1, request_timeout))
        return entries

    def exists(self, path: str, request_timeout: float | None = None) -> bool:
        return bool(self._get("/exists", path, request_timeout).get("exists"))

    def get_info(self, path: str, request_timeout: float | None = None) -> EntryInfo:
        return entry_from_wire(self._get("/info", path, request_timeout))

    def remove(self, path: str, request_timeout: float | None = None) -> None:
        """Remove a file, or a directory with everything in it."""
        self._sbx._http.request("DELETE", self._base(), query={"path": _volume_path(path), "recursive": "true"},
                                timeout=request_timeout)

    def rename(self, old_path: str, new_path: str, request_timeout: float | None = None) -> EntryInfo:
        body = {"old_path": _volume_path(old_path), "new_path": _volume_path(new_path)}
        return entry_from_wire(self._sbx._http.request("POST", self._base() + "/rename", body=body, timeout=request_timeout))

    def make_dir(self, path: str, request_timeout: float | None = None) -> bool:
        """Make a directory and its parents. False if it already existed (as in E2B)."""
        try:
            if self.get_info(path, request_timeout).type == FileType.DIR:
                return False
        except NotFoundException:
            pass
        self._sbx._http.request("POST", self._base() + "/mkdir", body={"path": _volume_path(path)}, timeout=request_timeout)
        return True
