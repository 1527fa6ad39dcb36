"""The messages between the supervisor (web process) and its workers.

A worker runs hostile guests, so after an engine escape it is hostile too
(T-PROTO-1). Nothing it sends may make the supervisor run code: frames are
UTF-8 JSON objects, never pickles, carried by ``Connection.send_bytes`` /
``recv_bytes`` (the connection adds the length prefix, and ``recv_bytes``
refuses a frame longer than the cap we give it). Every frame is decoded into
one of the frozen dataclasses below and checked field by field: an unknown
type, a missing or extra field, a wrong type, an out-of-range value or an
oversized frame raises ``ProtocolError``, and the pool treats the worker as
lost.

Both directions use the same codec; ``bytes`` travel as base64 text.
Pure module: no I/O here.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

# Statuses a run may end with (the v1 API's list).
RUN_STATUSES = frozenset({"ok", "error", "timeout", "memory_limit", "output_limit", "killed"})
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_TEXT = 64 * 1024  # error messages, notes, traces: short by nature
# Rich results (T-DOS-1): the MIME types a result bundle may carry, how many
# bundles one run may return, and the hard ceiling on their text (the
# configured caps are lower; config.HARD_RESULTS_BYTES).
RESULT_MIMES = frozenset({"text/plain", "text/html", "text/markdown", "text/latex", "image/png", "image/jpeg",
                          "image/svg+xml", "application/json"})
MAX_RESULTS = 64
HARD_RESULTS_CHARS = 64 * 1024 * 1024


class ProtocolError(Exception):
    """A frame that is not a valid message: the peer is not to be trusted."""


# -- web process -> worker ------------------------------------------------------

@dataclass(frozen=True)
class EgressSpec:
    enabled: bool
    allow_hosts: list[str]
    deny: list[str]  # the operator's CIDRs (SYNAPSE_EGRESS_DENY); required (T-SSRF-1)
    hosts: dict[str, list[str]] | None = None


@dataclass(frozen=True)
class VolumeLimit:
    """What one volume may hold while a run writes to it (T-DISK-1)."""
    bytes: int
    entries: int


@dataclass(frozen=True)
class BindRequest:
    TYPE: ClassVar[str] = "bind"
    req_id: int
    cell_id: str
    template: str
    volume: str
    memory_mb: int
    envs: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExecRequest:
    TYPE: ClassVar[str] = "exec"
    req_id: int
    template: str
    code: bytes
    is_text: bool
    timeout_ms: int
    memory_mb: int
    tenant_id: str
    cell_id: str | None = None  # None: a one-shot run (or a wasm module)
    volume: str | None = None
    stream: bool = False
    envs: dict[str, str] = field(default_factory=dict)
    persistent: bool = True
    known_session: bool = False
    egress: EgressSpec | None = None
    features: list[str] = field(default_factory=list)  # Pro host functions the license grants (T-LIC-2)
    quota_left: int | None = None
    files_left: int | None = None
    volume_limit: VolumeLimit | None = None
    stdin: bytes | None = None


TENANT_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # the volume layer's tenant ids (confine.py)


@dataclass(frozen=True)
class TenantBindRequest:
    """Bind an unbound (spare) worker to one tenant (T-TENANT-1): it narrows
    its Landlock rules to that tenant's volume and /tmp directories, installs
    its final seccomp filter, and only then runs guests. Sent once per worker;
    a bound worker is never bound again (it is reclaimed instead)."""
    TYPE: ClassVar[str] = "tenant"
    req_id: int
    tenant_id: str

    def __post_init__(self) -> None:
        # Host data, but it becomes a path in the worker: fail closed.
        if not TENANT_ID.fullmatch(self.tenant_id):
            raise ProtocolError("malformed tenant id")


@dataclass(frozen=True)
class DropRequest:
    TYPE: ClassVar[str] = "drop"
    req_id: int
    cell_id: str


@dataclass(frozen=True)
class StatsRequest:
    TYPE: ClassVar[str] = "stats"
    req_id: int


@dataclass(frozen=True)
class PingRequest:
    TYPE: ClassVar[str] = "ping"
    req_id: int


# -- worker -> web process ------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    TYPE: ClassVar[str] = "ready"
    pid: int


@dataclass(frozen=True)
class RunChunk:
    TYPE: ClassVar[str] = "chunk"
    req_id: int
    fd: int
    data: bytes

    def __post_init__(self) -> None:
        if self.fd not in (1, 2):
            raise ProtocolError(f"chunk for fd {self.fd}")


@dataclass(frozen=True)
class ResultBundle:
    """One rich result of a run (guest output, like stdout): MIME type -> text."""
    data: dict[str, str]
    is_main_result: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.data) - RESULT_MIMES
        if unknown:
            raise ProtocolError(f"unknown result MIME type(s) {sorted(unknown)[:3]!r}"[:200])
        if sum(len(v) for v in self.data.values()) > HARD_RESULTS_CHARS:
            raise ProtocolError("result too large")


@dataclass(frozen=True)
class RunOutcome:
    exit_code: int
    status: str
    stdout: str
    stderr: str
    truncated: bool
    session_alive: bool = True
    restarted: bool = False
    note: str | None = None
    denials: list[dict[str, str]] = field(default_factory=list)
    results: list[ResultBundle] = field(default_factory=list)
    results_truncated: bool = False

    def __post_init__(self) -> None:
        if len(self.results) > MAX_RESULTS:  # T-DOS-1
            raise ProtocolError("too many results")
        if sum(len(v) for r in self.results for v in r.data.values()) > HARD_RESULTS_CHARS:
            raise ProtocolError("results too large")
        if self.status not in RUN_STATUSES:
            raise ProtocolError(f"unknown run status {self.status[:40]!r}")
        if self.note is not None and len(self.note) > MAX_TEXT:
            raise ProtocolError("note too long")
        if len(self.denials) > 1000:
            raise ProtocolError("too many denials")


@dataclass(frozen=True)
class VolumeUsage:
    """A worker's walk of a cell's volume after a run (T-DISK-1). ``measured``
    False: the walk failed, and the web process counts the volume as over quota."""
    bytes: int = 0
    entries: int = 0
    complete: bool = True
    measured: bool = True

    def __post_init__(self) -> None:
        if self.bytes < 0 or self.entries < 0:
            raise ProtocolError("negative volume usage")


@dataclass(frozen=True)
class RunReply:
    TYPE: ClassVar[str] = "result"
    req_id: int
    outcome: RunOutcome
    guest_ms: float
    volume_usage: VolumeUsage | None = None  # None: the run had no volume of a cell


@dataclass(frozen=True)
class ErrorReply:
    TYPE: ClassVar[str] = "error"
    req_id: int | None
    status: int
    code: str
    message: str
    trace: str | None = None

    def __post_init__(self) -> None:
        # A worker may refuse a request, never claim success through an error.
        if not 400 <= self.status <= 599:
            raise ProtocolError(f"error status {self.status}")
        if not _CODE.fullmatch(self.code):
            raise ProtocolError("malformed error code")
        if len(self.message) > MAX_TEXT or (self.trace is not None and len(self.trace) > MAX_TEXT):
            raise ProtocolError("error text too long")


@dataclass(frozen=True)
class OkReply:
    TYPE: ClassVar[str] = "ok"
    req_id: int
    warm: bool = False


@dataclass(frozen=True)
class StatsReply:
    TYPE: ClassVar[str] = "stats"
    req_id: int
    sessions: int
    warm: dict[str, int]
    cache_hits: int
    cache_misses: int


@dataclass(frozen=True)
class Pong:
    TYPE: ClassVar[str] = "pong"
    req_id: int


Request = Union[BindRequest, ExecRequest, DropRequest, StatsRequest, PingRequest, TenantBindRequest]
Reply = Union[Ready, RunChunk, RunReply, ErrorReply, OkReply, StatsReply, Pong]

TO_WORKER: dict[str, type[Any]] = {c.TYPE: c for c in (BindRequest, ExecRequest, DropRequest, StatsRequest, PingRequest)}
# What an unbound worker accepts: only the tenant bind (T-TENANT-1).
TO_SPARE: dict[str, type[Any]] = {TenantBindRequest.TYPE: TenantBindRequest}
FROM_WORKER: dict[str, type[Any]] = {c.TYPE: c for c in (Ready, RunChunk, RunReply, ErrorReply, OkReply, StatsReply, Pong)}


def max_frame_bytes(output_cap_bytes: int, results_cap_bytes: int = 0) -> int:
    """The largest frame a worker may send: two capped streams and the rich
    results' text, each at the worst JSON escaping (6 bytes per character),
    plus room for the rest (a result's keys and flags: 256 bytes each)."""
    return 12 * output_cap_bytes + 6 * results_cap_bytes + 256 * MAX_RESULTS + (1 << 20)


# -- encoding -------------------------------------------------------------------

def encode(msg: Any) -> bytes:
    """One message as a frame (UTF-8 JSON)."""
    kind = getattr(type(msg), "TYPE", None)
    if not isinstance(kind, str) or not dataclasses.is_dataclass(msg):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    body = _to_json(msg)
    body["type"] = kind
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(v) for v in value]
    return value


# -- decoding -------------------------------------------------------------------

def decode(frame: bytes, table: dict[str, type[Any]], max_bytes: int) -> Any:
    """A frame back into a message of ``table`` (FROM_WORKER or TO_WORKER), or ProtocolError."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        raw = json.loads(frame.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"not a JSON frame: {type(e).__name__}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("frame is not an object")
    kind = raw.pop("type", None)
    cls = table.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    return _build(cls, raw)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _build(cls: type[Any], raw: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    extra = set(raw) - set(fields)
    if extra:
        raise ProtocolError(f"{cls.__name__}: unexpected field(s) {sorted(extra)[:5]}")
    values: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(f"{cls.__name__}: missing field {name}")
            continue
        values[name] = _check(hints[name], raw[name], f"{cls.__name__}.{name}")
    try:
        return cls(**values)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None


def _check(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]  # only "X | None" is used
        return _check(inner, value, where)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < (1 << 63):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is bytes:
        if isinstance(value, str):
            try:
                return base64.b64decode(value.encode("ascii"), validate=True)
            except (binascii.Error, UnicodeEncodeError):
                pass
    elif origin is list:
        (item,) = typing.get_args(hint)
        if isinstance(value, list):
            return [_check(item, v, f"{where}[]") for v in value]
    elif origin is dict:
        key, item = typing.get_args(hint)
        if isinstance(value, dict) and key is str:
            return {k: _check(item, v, f"{where}{{}}") for k, v in value.items()}
    elif dataclasses.is_dataclass(hint):
        if isinstance(value, dict):
            return _build(hint, value)  # type: ignore[arg-type]
    raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")
