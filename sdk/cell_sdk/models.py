"""Result types, shaped like E2B's (``Execution``, ``Result``, ``Logs``,
``ExecutionError``, ``OutputMessage``, ``EntryInfo``, ``SandboxInfo``), plus
what a Cell answer adds: the execution id, status, exit code and receipt."""
from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

_FORMATS = ("text", "html", "markdown", "svg", "png", "jpeg", "pdf", "latex", "json", "javascript")


@dataclass
class OutputMessage:
    """One piece of streamed output, as it arrived."""

    line: str
    timestamp: int  # ns since the epoch, when the SDK received it
    error: bool = False

    def __str__(self) -> str:
        return self.line


@dataclass
class Logs:
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


@dataclass
class ExecutionError:
    """The exception the code raised: ``name`` and ``value`` as the guest's
    interpreter printed them, ``traceback`` the text it printed."""

    name: str
    value: str
    traceback: str


@dataclass
class Result:
    """One displayed value of a run, shaped like E2B's: the value of the last
    bare expression (``is_main_result``), a ``display(obj)``, or a matplotlib
    figure (``png``). The server returns each as a MIME bundle; Python runs
    fill ``text`` and whichever of ``html``, ``markdown``, ``svg``, ``png``,
    ``jpeg``, ``latex`` and ``json`` the object had (a DataFrame's records are
    ``json`` and ``data``). JavaScript runs have only a main ``text``."""

    text: str | None = None
    html: str | None = None
    markdown: str | None = None
    svg: str | None = None
    png: str | None = None  # base64, as E2B's
    jpeg: str | None = None
    pdf: str | None = None
    latex: str | None = None
    json: Any = None
    javascript: str | None = None
    data: Any = None
    chart: Any = None
    is_main_result: bool = False
    extra: dict[str, Any] | None = None

    @classmethod
    def from_bundle(cls, bundle: dict[str, Any]) -> Result:
        """A result from one item of an answer's ``results`` (MIME type -> text)."""
        def text(mime: str) -> str | None:
            value = bundle.get(mime)
            return value if isinstance(value, str) else None

        parsed: Any = None
        raw = text("application/json")
        if raw is not None:
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
        return cls(text=text("text/plain"), html=text("text/html"), markdown=text("text/markdown"),
                   svg=text("image/svg+xml"), png=text("image/png"), jpeg=text("image/jpeg"), latex=text("text/latex"),
                   json=parsed, data=parsed if isinstance(parsed, (dict, list)) else None,
                   is_main_result=bundle.get("is_main_result") is True)

    def formats(self) -> list[str]:
        return [name for name in _FORMATS if getattr(self, name) is not None]

    def __str__(self) -> str:
        return self.text or ""

    # Shown as themselves in a notebook that holds an Execution's results.
    def _repr_html_(self) -> str | None:
        return self.html

    def _repr_markdown_(self) -> str | None:
        return self.markdown

    def _repr_svg_(self) -> str | None:
        return self.svg

    def _repr_png_(self) -> str | None:
        return self.png

    def _repr_jpeg_(self) -> str | None:
        return self.jpeg

    def _repr_latex_(self) -> str | None:
        return self.latex

    def _repr_json_(self) -> Any:
        return self.json


@dataclass
class Execution:
    """What one ``run_code`` produced.

    ``logs`` hold stdout and stderr exactly as the server returned them (and as
    the receipt hashes them), split into lines that keep their newline.
    """

    results: list[Result] = field(default_factory=list)
    logs: Logs = field(default_factory=Logs)
    error: ExecutionError | None = None
    execution_count: int | None = None
    execution_id: str = ""
    status: str = ""
    exit_code: int = 0
    latency_ms: float = 0.0
    truncated: bool = False
    stdout: str = ""
    stderr: str = ""
    receipt: dict[str, Any] = field(default_factory=dict)
    restarted: bool = False
    # The cell's interpreter came back from its snapshot (after a restart, a
    # pause or a lost worker), or went back to its idle capture because this
    # run crashed it: ``note`` says how far back.
    restored: bool = False
    rolled_back: bool = False
    note: str | None = None

    @property
    def text(self) -> str | None:
        for result in self.results:
            if result.is_main_result:
                return result.text
        return None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    def receipt_matches(self, code: str | bytes) -> bool:
        """Recompute the receipt's v1 hash (docs/receipts.md) from ``code`` and this
        answer, offline. True when the receipt covers exactly this run."""
        r = self.receipt
        if r.get("schema") != "v1":
            return False
        data = code.encode("utf-8") if isinstance(code, str) else code
        result = json.dumps({"exit_code": self.exit_code, "status": self.status, "stderr": self.stderr, "stdout": self.stdout},
                            sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        code_hash = hashlib.sha256(data).hexdigest()
        result_hash = hashlib.sha256(result).hexdigest()
        if r.get("execution_id") != self.execution_id or r.get("code_hash") != code_hash or r.get("result_hash") != result_hash:
            return False
        line = f"{r['execution_id']}|{code_hash}|{result_hash}|{r.get('template')}|{r.get('timestamp')}"
        return hashlib.sha256(line.encode("utf-8")).hexdigest() == r.get("receipt_hash")


class FileType(str, enum.Enum):
    FILE = "file"
    DIR = "dir"


@dataclass
class WriteInfo:
    name: str
    type: FileType | None
    path: str


@dataclass
class EntryInfo(WriteInfo):
    """E2B's ``EntryInfo``. Cell reports name, type, path, size and
    modification time; ``mode``/``permissions``/``owner``/``group`` are the
    guest's view (the volume belongs to the cell) and ``symlink_target`` is
    always None (symlinks out of the volume are refused)."""

    size: int = 0
    mode: int = 0
    permissions: str = ""
    owner: str = ""
    group: str = ""
    modified_time: dt.datetime | None = None
    symlink_target: str | None = None
    metadata: dict[str, str] | None = None


@dataclass
class SandboxInfo:
    sandbox_id: str
    template_id: str
    name: str
    metadata: dict[str, str]
    started_at: dt.datetime
    end_at: dt.datetime | None
    state: str
    timeout_ms: int = 0
    persistent: bool = True

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> SandboxInfo:
        expires = d.get("expires_at")
        return cls(
            sandbox_id=str(d.get("cell_id", "")),
            template_id=str(d.get("template", "")),
            name=str(d.get("template", "")),
            metadata=dict(d.get("metadata") or {}),
            started_at=_from_ms(d.get("created_at")) or dt.datetime.fromtimestamp(0, dt.timezone.utc),
            end_at=_from_ms(expires),
            state=str(d.get("status", "running")),
            timeout_ms=int(d.get("timeout_ms") or 0),
            persistent=bool(d.get("persistent", True)),
        )


def _from_ms(value: Any) -> dt.datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return dt.datetime.fromtimestamp(value / 1000, dt.timezone.utc)
    return None


def _from_time(value: Any) -> dt.datetime | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # seconds or milliseconds since the epoch
        return dt.datetime.fromtimestamp(value / 1000 if value > 1e11 else value, dt.timezone.utc)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
    return None


def entry_from_wire(d: dict[str, Any]) -> EntryInfo:
    kind = d.get("type")
    return EntryInfo(
        name=str(d.get("name", "")),
        type=FileType(kind) if kind in ("file", "dir") else None,
        path=str(d.get("path", "")),
        size=int(d.get("size") or 0),
        modified_time=_from_time(d.get("modified_time")),
    )
