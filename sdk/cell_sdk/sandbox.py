"""``Sandbox``: one Cell (a persistent interpreter and its volume), with
E2B's method names. Standard library only."""
from __future__ import annotations

import base64
import contextlib
import functools
import threading
import time
from types import TracebackType
from typing import Any, Callable, Generic, Iterator, TypeVar

from cell_sdk import _parse
from cell_sdk._http import ConnectionConfig, Transport
from cell_sdk.exceptions import InvalidArgumentException, NotFoundException, SandboxKilledException, TimeoutException
from cell_sdk.filesystem import Filesystem
from cell_sdk.models import Execution, Logs, OutputMessage, Result, SandboxInfo

T = TypeVar("T")
OutputHandler = Callable[[OutputMessage], Any]
DEFAULT_TEMPLATE = "python3"
# The server's hard ceiling on one run (appliance.config): the HTTP wait for a
# run without its own timeout must outlast it.
RUN_CEILING_S = 60.0
# Every template name, alias and language -> its template. The SDK installs
# without the appliance, so this mirrors appliance.runtime.templates.REGISTRY;
# tests/appliance/test_template_registry.py keeps the two equal.
LANGUAGE_TEMPLATES = {"python": "python3", "python3": "python3", "py": "python3",
                      "javascript": "javascript", "js": "javascript", "wasm": "wasm", "wat": "wasm"}


class _class_or_instance(Generic[T]):
    """``Sandbox.kill(sandbox_id)`` and ``sbx.kill()`` from one definition, as in E2B."""

    def __init__(self, fn: Callable[..., T]) -> None:
        self.fn = fn
        functools.update_wrapper(self, fn)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., T]:
        return functools.partial(self.fn, obj if obj is not None else owner)


def _seconds_to_ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(1, int(round(seconds * 1000)))


class Sandbox:
    """A Cell sandbox. ``Sandbox()`` / ``Sandbox.create()`` make a new cell;
    ``Sandbox.connect(sandbox_id)`` attaches to an existing one.

    ``timeout`` is the sandbox's idle lifetime in seconds (each run extends
    it); ``api_url``/``api_key`` default to ``CELL_API_URL``/``CELL_API_KEY``.
    """

    def __init__(self, template: str | None = None, timeout: float | None = None, metadata: dict[str, str] | None = None,
                 envs: dict[str, str] | None = None, *, api_url: str | None = None, api_key: str | None = None,
                 request_timeout: float | None = None, retries: int | None = None, persistent: bool = True,
                 memory_mb: int | None = None, _attach: dict[str, Any] | None = None,
                 _transport: Transport | None = None) -> None:
        config = ConnectionConfig.resolve(api_url, api_key, request_timeout, retries)
        self._http = _transport or Transport(config)
        self._lock = threading.Lock()
        self._count = 0
        if _attach is None:
            body: dict[str, Any] = {"template": template or DEFAULT_TEMPLATE, "persistent": persistent}
            if timeout is not None:
                body["timeout_ms"] = _seconds_to_ms(timeout)
            if metadata:
                body["metadata"] = metadata
            if envs:
                body["envs"] = envs
            if memory_mb is not None:
                body["memory_mb"] = memory_mb
            _attach = self._http.request("POST", "/v1/cells", body=body)
        self._info = SandboxInfo.from_wire(_attach)
        self.sandbox_id: str = self._info.sandbox_id
        self.template: str = self._info.template_id
        self.files = Filesystem(self)

    # -- lifecycle -------------------------------------------------------
    @classmethod
    def create(cls, template: str | None = None, timeout: float | None = None, metadata: dict[str, str] | None = None,
               envs: dict[str, str] | None = None, **opts: Any) -> Sandbox:
        return cls(template, timeout, metadata, envs, **opts)

    @classmethod
    def connect(cls, sandbox_id: str, timeout: float | None = None, **opts: Any) -> Sandbox:
        """Attach to a running cell; with ``timeout``, also reset its lifetime."""
        transport = Transport(ConnectionConfig.resolve(opts.pop("api_url", None), opts.pop("api_key", None),
                                                       opts.pop("request_timeout", None), opts.pop("retries", None)))
        try:
            info = transport.request("GET", f"/v1/cells/{sandbox_id}")
        except BaseException:
            transport.close()
            raise
        sbx = cls(_attach=info, _transport=transport)
        if timeout is not None:
            sbx.set_timeout(timeout)
        return sbx

    def fork(self) -> Sandbox:
        """A new sandbox of the same tenant starting from this one's variables
        and files (``POST /v1/cells/<id>/fork``; Python cells, between runs).
        The two then go their own ways. A cell that is running answers 409
        ``cell_busy``; a JavaScript or Wasm cell 409 ``fork_unsupported``."""
        transport = Transport(self._http.config)
        try:
            info = transport.request("POST", f"/v1/cells/{self.sandbox_id}/fork")
        except BaseException:
            transport.close()
            raise
        return type(self)(_attach=info, _transport=transport)

    @staticmethod
    @contextlib.contextmanager
    def _transport_for(target: Any, opts: dict[str, Any]) -> Iterator[Transport]:
        if isinstance(target, Sandbox):
            yield target._http
            return
        http = Transport(ConnectionConfig.resolve(opts.get("api_url"), opts.get("api_key"), opts.get("request_timeout")))
        try:
            yield http
        finally:
            http.close()

    @_class_or_instance
    def kill(target: Any, sandbox_id: str | None = None, **opts: Any) -> bool:  # noqa: N805
        """Delete the cell and its volume. True if it was killed, False if it
        was already gone (E2B's answer)."""
        sid = target.sandbox_id if isinstance(target, Sandbox) else sandbox_id
        with Sandbox._transport_for(target, opts) as http:
            try:
                http.request("DELETE", f"/v1/cells/{sid}")
            except NotFoundException:
                return False
        return True

    @_class_or_instance
    def set_timeout(target: Any, *args: Any, **opts: Any) -> None:  # noqa: N805
        """``sbx.set_timeout(seconds)`` or ``Sandbox.set_timeout(sandbox_id, seconds)``."""
        if isinstance(target, Sandbox):
            sid, seconds = target.sandbox_id, (args[0] if args else opts["timeout"])
        else:
            sid, seconds = (args[0] if args else opts["sandbox_id"]), (args[1] if len(args) > 1 else opts["timeout"])
        with Sandbox._transport_for(target, opts) as http:
            info = http.request("PUT", f"/v1/cells/{sid}/timeout", body={"timeout_ms": _seconds_to_ms(seconds)})
        if isinstance(target, Sandbox):
            target._info = SandboxInfo.from_wire(info)

    @_class_or_instance
    def get_info(target: Any, sandbox_id: str | None = None, **opts: Any) -> SandboxInfo:  # noqa: N805
        sid = target.sandbox_id if isinstance(target, Sandbox) else sandbox_id
        with Sandbox._transport_for(target, opts) as http:
            info = SandboxInfo.from_wire(http.request("GET", f"/v1/cells/{sid}"))
        if isinstance(target, Sandbox):
            target._info = info
        return info

    def is_running(self, request_timeout: float | None = None) -> bool:
        try:
            self._http.request("GET", f"/v1/cells/{self.sandbox_id}", timeout=request_timeout)
        except NotFoundException:
            return False
        return True

    @staticmethod
    def list(api_url: str | None = None, api_key: str | None = None, request_timeout: float | None = None) -> list[SandboxInfo]:
        """Every running cell of this API key's tenant (a plain list, not a paginator)."""
        http = Transport(ConnectionConfig.resolve(api_url, api_key, request_timeout))
        try:
            return [SandboxInfo.from_wire(c) for c in http.request("GET", "/v1/cells").get("cells", [])]
        finally:
            http.close()

    def close(self) -> None:
        """Drop this object's connections (the cell keeps running)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.kill()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(sandbox_id={self.sandbox_id!r}, template={self.template!r})"

    # -- code ------------------------------------------------------------
    def run_code(self, code: str | bytes, language: str | None = None, on_stdout: OutputHandler | None = None,
                 on_stderr: OutputHandler | None = None, on_result: Callable[[Result], Any] | None = None,
                 on_error: Callable[[Any], Any] | None = None, timeout: float | None = None,
                 request_timeout: float | None = None, envs: dict[str, str] | None = None) -> Execution:
        """Run ``code`` in this cell; variables, imports and functions persist
        between calls. ``timeout`` (seconds) limits the run; a run that hits it
        raises ``TimeoutException`` whose ``execution`` holds the run and its
        receipt (as E2B does). ``kill()`` of the sandbox meanwhile raises
        ``SandboxKilledException``. ``envs`` are environment variables for this
        run only, over the sandbox's own (``os.environ``, ``process.env``).
        ``on_stdout``/``on_stderr`` receive output as it arrives, and
        ``on_result`` each rich result (display(), plt.show(), the last
        expression) the moment it is shown (SSE).
        Python code indented as a whole (copied out of a block) runs as if
        dedented; the receipt still hashes it as sent.

        ``bytes`` code is a binary Wasm module (``wasm`` cells only). The run is
        sent once: on a dropped connection it is never re-sent.
        """
        if language is not None:
            want = LANGUAGE_TEMPLATES.get(language.lower())
            if want is None or want != self.template:
                raise InvalidArgumentException(
                    f"this sandbox runs {self.template}; language {language!r} needs a sandbox of that template "
                    f"(Cell has one interpreter per sandbox, no per-call contexts)", code="language_mismatch")
        body = _code_body(code)
        if language is not None:
            body["language"] = language.lower()
        if timeout is not None and timeout > 0:
            body["timeout_ms"] = _seconds_to_ms(timeout)
        if envs:
            body["envs"] = dict(envs)
        wait = request_timeout or max(self._http.config.request_timeout, (timeout or RUN_CEILING_S) + 30.0)
        path = f"/v1/cells/{self.sandbox_id}/exec"
        delivered = [0]  # rich results handed to on_result as they streamed in
        # Any callback streams the run (SSE): on_result gets each rich result as
        # the guest shows it, before the run ends, as E2B's does.
        if on_stdout is None and on_stderr is None and on_result is None:
            answer = self._http.request("POST", path, body=body, timeout=wait)
        else:
            def on_event(event: dict[str, Any]) -> None:
                if event.get("type") == "rich_result":
                    bundle = event.get("result")
                    if on_result is not None and isinstance(bundle, dict):
                        delivered[0] += 1
                        on_result(Result.from_bundle(bundle))
                    return
                text = str(event.get("text", ""))
                is_err = event.get("type") == "stderr"
                handler = on_stderr if is_err else on_stdout
                if handler is not None and text:
                    handler(OutputMessage(line=text, timestamp=time.time_ns(), error=is_err))

            answer = self._http.stream(path + "/stream", body, wait, on_event)
        with self._lock:
            self._count += 1
            count = self._count
        execution = execution_from_answer(answer, self.template, code, count)
        if answer.get("cell_deleted"):
            raise SandboxKilledException(f"sandbox {self.sandbox_id} was killed while this run was in flight",
                                         code="sandbox_killed", execution=execution)
        if execution.status == "timeout":
            raise TimeoutException(f"the run hit its time limit ({execution.note or 'timeout'})", code="run_timeout",
                                   execution=execution)
        if on_result is not None:  # those not streamed (a plain run, or a JavaScript echo read from stdout)
            for result in execution.results[delivered[0]:]:
                on_result(result)
        if on_error is not None and execution.error is not None:
            on_error(execution.error)
        return execution

    def get_receipt(self, execution_id: str) -> dict[str, Any]:
        """The full stored receipt of a run (signature, chain position)."""
        return dict(self._http.request("GET", f"/v1/receipts/{execution_id}"))


def _code_body(code: str | bytes) -> dict[str, Any]:
    if isinstance(code, (bytes, bytearray, memoryview)):
        return {"code_b64": base64.b64encode(bytes(code)).decode("ascii")}
    if not isinstance(code, str):
        raise InvalidArgumentException("code must be str (source or WAT) or bytes (a Wasm module)", code="invalid_field")
    return {"code": code}


def execution_from_answer(answer: dict[str, Any], template: str, code: str | bytes, count: int | None) -> Execution:
    stdout, stderr = str(answer.get("stdout", "")), str(answer.get("stderr", ""))
    status, exit_code = str(answer.get("status", "")), int(answer.get("exit_code", 0))
    note = answer.get("note")
    # The server's own results (MIME bundles). A JavaScript run has one only for a
    # plain object or array; otherwise its main result is still read from the
    # REPL's echo (_parse.main_js_result_text).
    results = [Result.from_bundle(b) for b in answer.get("results") or [] if isinstance(b, dict)]
    if template == "javascript" and not results and isinstance(code, str):
        text = _parse.main_js_result_text(code, stdout, status)
        if text is not None:
            results.append(Result(text=text, is_main_result=True))
    return Execution(
        results=results,
        logs=Logs(stdout=_parse.split_lines(stdout), stderr=_parse.split_lines(stderr)),
        error=_parse.execution_error(template, status, exit_code, stderr, note if isinstance(note, str) else None),
        execution_count=count,
        execution_id=str(answer.get("execution_id", "")),
        status=status,
        exit_code=exit_code,
        latency_ms=float(answer.get("latency_ms", 0.0)),
        truncated=bool(answer.get("truncated", False)),
        stdout=stdout,
        stderr=stderr,
        receipt=dict(answer.get("receipt") or {}),
        restarted=bool(answer.get("restarted", False)),
        restored=bool(answer.get("restored", False)),
        rolled_back=bool(answer.get("rolled_back", False)),
        note=note if isinstance(note, str) else None,
    )
