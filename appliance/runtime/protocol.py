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
from typing import Any, Callable, ClassVar, Union

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
# Host calls the supervisor makes for a worker (the broker, T-ESCAPE-3): the
# guest's URL and MCP request are guest-controlled, so their frames are capped
# like the host functions cap them (hostfuncs.MAX_URL_BYTES, bounds.MAX_TRANSFER).
MAX_CALL_URL_BYTES = 2048
MAX_CALL_BYTES = 10_000_000
MAX_CALL_FRAME = 4 * MAX_CALL_BYTES // 3 + 64 * 1024  # one call's bytes in base64, plus its small fields


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
    # This run only, over the cell's own ``envs`` (E2B's ``run_code(envs=)``).
    # Not in the receipt's v1 hash; values may be secrets: never logged.
    run_envs: dict[str, str] = field(default_factory=dict)
    # The cell has no interpreter on this worker and a snapshot of it exists:
    # restore it from ``snapshots/<tenant>/<cell>`` before the run (T-IMAGE-2).
    restore: bool = False


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
    # T-IMAGE-2: the MAC key of this tenant's cell snapshots, derived by the
    # supervisor from a node secret the worker never sees (snapshot_file.tenant_key).
    snapshot_key: bytes = b""

    def __post_init__(self) -> None:
        # Host data, but it becomes a path in the worker: fail closed.
        if not TENANT_ID.fullmatch(self.tenant_id):
            raise ProtocolError("malformed tenant id")
        if self.snapshot_key and len(self.snapshot_key) != 32:
            raise ProtocolError("snapshot key must be 32 bytes")


def _check_cell_id(*ids: str) -> None:
    # A cell id becomes a file name in the worker (its snapshot): fail closed.
    for cell_id in ids:
        if not TENANT_ID.fullmatch(cell_id):
            raise ProtocolError("malformed cell id")


@dataclass(frozen=True)
class ForkRequest:
    """Start cell ``new_cell_id`` from the state of ``cell_id`` between runs
    (its interpreter captured and restored into a new session, its /data and
    /tmp copied within ``volume_limit``). ``restore``: the source has no
    interpreter here and is first restored from its snapshot."""
    TYPE: ClassVar[str] = "fork"
    req_id: int
    cell_id: str
    new_cell_id: str
    template: str
    volume: str
    new_volume: str
    memory_mb: int
    volume_limit: VolumeLimit
    envs: dict[str, str] = field(default_factory=dict)
    restore: bool = False

    def __post_init__(self) -> None:
        _check_cell_id(self.cell_id, self.new_cell_id)


@dataclass(frozen=True)
class CaptureRequest:
    """Write the interpreter state of ``cell_id`` (idle, between runs) to its
    snapshot file (T-IMAGE-2): on SIGTERM drain, to pause an idle cell, and
    (session kept) as the idle capture a crash rolls back to."""
    TYPE: ClassVar[str] = "capture"
    req_id: int
    cell_id: str
    release: bool = False  # then close the session: the cell is paused, its RAM given back

    def __post_init__(self) -> None:
        _check_cell_id(self.cell_id)


@dataclass(frozen=True)
class DropRequest:
    TYPE: ClassVar[str] = "drop"
    req_id: int
    cell_id: str


@dataclass(frozen=True)
class CancelRequest:
    """Stop the run in flight in ``cell_id`` now (its cell is being deleted);
    answered ``OkReply`` once that run has ended, or at once when none runs."""
    TYPE: ClassVar[str] = "cancel"
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


@dataclass(frozen=True)
class CallAnswer:
    """The supervisor's answer to a worker's FetchCall or McpCall (the broker).

    ``code``: bytes in ``body`` (>= 0) or the host function's negative code;
    ``denial``: the policy's reason when the call was denied (for the run's denials)."""
    TYPE: ClassVar[str] = "call_answer"
    req_id: int
    call_id: int
    code: int
    body: bytes = b""
    denial: str | None = None

    def __post_init__(self) -> None:
        if len(self.body) > MAX_CALL_BYTES or (self.code >= 0 and self.code != len(self.body)) \
                or (self.code < 0 and self.body):
            raise ProtocolError("call answer body does not match its code")
        if not -8 <= self.code <= MAX_CALL_BYTES:
            raise ProtocolError("call answer code out of range")
        if self.denial is not None and len(self.denial) > 256:
            raise ProtocolError("denial reason too long")


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
class RunResult:
    """One rich result of a streamed run, sent the moment the guest shows it
    (display(), plt.show(), the last expression). ``index`` counts from 0 in
    the order shown; the web process checks it, the count and their size
    (T-DOS-1, T-PROTO-1), and the run's final answer lists exactly these."""
    TYPE: ClassVar[str] = "rich"
    req_id: int
    index: int
    result: ResultBundle

    def __post_init__(self) -> None:
        if not 0 <= self.index < MAX_RESULTS:
            raise ProtocolError(f"result index {self.index} out of range")


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
    cancelled: bool = False  # stopped by a CancelRequest (its cell was deleted)
    restored: bool = False  # the cell's interpreter was restored from its snapshot before this run
    rolled_back: bool = False  # the run killed the interpreter; the cell went back to its capture from before it

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


def _check_call(call_id: int, max_len: int) -> None:
    if call_id < 1:
        raise ProtocolError("call id must be positive")
    if not 0 <= max_len <= MAX_CALL_BYTES:  # T-DOS-1
        raise ProtocolError("call max_len out of range")


def call_url_ok(url: str) -> bool:
    """What a FetchCall may carry: at most 2048 UTF-8 bytes, no control
    character or whitespace (the egress parser refuses those as bad_url
    anyway). The worker denies anything else itself and never sends it (T-ESCAPE-3)."""
    if len(url) > MAX_CALL_URL_BYTES or len(url.encode("utf-8", "surrogatepass")) > MAX_CALL_URL_BYTES:
        return False
    return not any(ord(ch) <= 0x20 or 0x7F <= ord(ch) <= 0x9F or ch.isspace() for ch in url)


@dataclass(frozen=True)
class FetchCall:
    """A worker asks the supervisor to run ``host_fetch`` for run ``req_id`` (T-ESCAPE-3).

    Only for the run in flight on that worker; the supervisor applies the
    egress policy it sent with that run, never anything in this frame."""
    TYPE: ClassVar[str] = "fetch_call"
    req_id: int
    call_id: int
    url: str
    max_len: int

    def __post_init__(self) -> None:
        _check_call(self.call_id, self.max_len)
        if not call_url_ok(self.url):
            raise ProtocolError("fetch URL too long or holding control characters")


@dataclass(frozen=True)
class McpCall:
    """A worker asks the supervisor to run ``host_mcp_call`` for run ``req_id``
    (T-ESCAPE-3); ``request`` is the guest's raw request, parsed by the supervisor."""
    TYPE: ClassVar[str] = "mcp_call"
    req_id: int
    call_id: int
    request: bytes
    max_len: int

    def __post_init__(self) -> None:
        _check_call(self.call_id, self.max_len)
        if len(self.request) > MAX_CALL_BYTES:
            raise ProtocolError("MCP request too large")


Request = Union[BindRequest, ExecRequest, DropRequest, StatsRequest, PingRequest, CancelRequest, TenantBindRequest,
                ForkRequest, CaptureRequest]
Reply = Union[Ready, RunChunk, RunResult, RunReply, ErrorReply, OkReply, StatsReply, Pong, FetchCall, McpCall]
HostCall = Union[FetchCall, McpCall]
HOST_CALLS = (FetchCall, McpCall)

TO_WORKER: dict[str, type[Any]] = {c.TYPE: c for c in (BindRequest, ExecRequest, DropRequest, StatsRequest, PingRequest,
                                                       CancelRequest, CallAnswer, ForkRequest, CaptureRequest)}
# What an unbound worker accepts: only the tenant bind (T-TENANT-1).
TO_SPARE: dict[str, type[Any]] = {TenantBindRequest.TYPE: TenantBindRequest}
FROM_WORKER: dict[str, type[Any]] = {c.TYPE: c for c in (Ready, RunChunk, RunResult, RunReply, ErrorReply, OkReply, StatsReply, Pong,
                                                         FetchCall, McpCall)}


def max_frame_bytes(output_cap_bytes: int, results_cap_bytes: int = 0) -> int:
    """The largest frame a worker may send: two capped streams and the rich
    results' text, each at the worst JSON escaping (6 bytes per character),
    plus room for the rest (a result's keys and flags: 256 bytes each)."""
    return max(12 * output_cap_bytes + 6 * results_cap_bytes + 256 * MAX_RESULTS + (1 << 20), MAX_CALL_FRAME)


# -- encoding -------------------------------------------------------------------

def encode(msg: Any) -> bytes:
    """One message as a frame (UTF-8 JSON)."""
    kind = getattr(type(msg), "TYPE", None)
    if not isinstance(kind, str) or not dataclasses.is_dataclass(msg):
        raise TypeError(f"not a protocol message: {type(msg).__name__}")
    body = _to_json(msg)
    body["type"] = kind
    return _ENCODER.encode(body).encode()


_FIELD_NAMES: dict[type[Any], tuple[str, ...]] = {}  # a message class's field names, looked up once


# The common leaves, passed through as they are (no call of _to_json each).
_LEAVES = frozenset({str, int, bool, float, type(None)})


def _to_json(value: Any) -> Any:
    kind = type(value)
    if kind in _LEAVES:
        return value
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    names = _FIELD_NAMES.get(kind)
    if names is None and dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = _FIELD_NAMES[kind] = tuple(f.name for f in dataclasses.fields(value))
    leaves = _LEAVES
    if names is not None:
        out = {}
        for name in names:
            item = getattr(value, name)
            out[name] = item if type(item) in leaves else _to_json(item)
        return out
    if isinstance(value, dict):
        return {k: v if type(v) in leaves else _to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [v if type(v) in leaves else _to_json(v) for v in value]
    return value


# -- decoding -------------------------------------------------------------------

def decode(frame: bytes, table: dict[str, type[Any]], max_bytes: int) -> Any:
    """A frame back into a message of ``table`` (FROM_WORKER or TO_WORKER), or ProtocolError."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"frame of {len(frame)} bytes exceeds {max_bytes}")
    try:
        raw = _DECODER.decode(frame.decode("utf-8"))
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


# One encoder and one decoder for every frame, as json.dumps/json.loads keep
# one for their defaults: given options, they build a new one on each call
# (a few microseconds of each message, twice per run in each process).
# Neither keeps state between calls.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)
_DECODER = json.JSONDecoder(parse_constant=_no_constant)


# Per message class, worked out once: each field's name, whether it has a
# default, and a checker built from its type. typing.get_type_hints
# re-evaluates every string annotation on each call, and was the largest
# single cost of a run in the web process; the checkers also skip the
# typing.get_origin/get_args dispatch per value. The classes are fixed at
# import time, so nothing here goes stale.
Checker = Callable[[Any], Any]
_SCHEMAS: dict[type[Any], tuple[frozenset[str], list[tuple[str, bool, Checker]]]] = {}


def _schema(cls: type[Any]) -> tuple[frozenset[str], list[tuple[str, bool, Checker]]]:
    found = _SCHEMAS.get(cls)
    if found is None:
        hints = typing.get_type_hints(cls)
        fields = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            fields.append((f.name, required, _checker(hints[f.name], f"{cls.__name__}.{f.name}")))
        found = (frozenset(name for name, _, _ in fields), fields)
        _SCHEMAS[cls] = found
    return found


def _build(cls: type[Any], raw: dict[str, Any]) -> Any:
    names, fields = _schema(cls)
    if not names.issuperset(raw):
        extra = set(raw) - names
        raise ProtocolError(f"{cls.__name__}: unexpected field(s) {sorted(extra)[:5]}")
    values: dict[str, Any] = {}
    for name, required, check in fields:
        if name not in raw:
            if required:
                raise ProtocolError(f"{cls.__name__}: missing field {name}")
            continue
        values[name] = check(raw[name])
    try:
        return cls(**values)
    except ProtocolError:
        raise
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None


def _checker(hint: Any, where: str) -> Checker:
    """The check of one field's value against its type (``where`` names it in errors)."""
    def wrong(value: Any) -> Any:
        raise ProtocolError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {type(value).__name__}")

    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        (inner_hint,) = [o for o in options if o is not type(None)]  # only "X | None" is used
        inner = _checker(inner_hint, where)
        if type(None) not in options:
            return inner

        def optional(value: Any) -> Any:
            return None if value is None else inner(value)
        return optional
    if hint is bool:
        return lambda value: value if isinstance(value, bool) else wrong(value)
    if hint is int:
        return lambda value: (value if isinstance(value, int) and not isinstance(value, bool)
                              and -(1 << 63) <= value < (1 << 63) else wrong(value))
    if hint is float:
        return lambda value: (float(value) if isinstance(value, (int, float)) and not isinstance(value, bool)
                              else wrong(value))
    if hint is str:
        return lambda value: value if isinstance(value, str) else wrong(value)
    if hint is bytes:
        def as_bytes(value: Any) -> Any:
            if isinstance(value, str):
                try:
                    return base64.b64decode(value.encode("ascii"), validate=True)
                except (binascii.Error, UnicodeEncodeError):
                    pass
            return wrong(value)
        return as_bytes
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        item = _checker(item_hint, f"{where}[]")
        return lambda value: [item(v) for v in value] if isinstance(value, list) else wrong(value)
    if origin is dict:
        key, item_hint = typing.get_args(hint)
        if key is not str:
            return wrong
        item = _checker(item_hint, f"{where}{{}}")
        return lambda value: {k: item(v) for k, v in value.items()} if isinstance(value, dict) else wrong(value)
    if dataclasses.is_dataclass(hint):
        cls: type[Any] = hint  # type: ignore[assignment]
        return lambda value: _build(cls, value) if isinstance(value, dict) else wrong(value)
    return wrong
