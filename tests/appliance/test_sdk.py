"""The SDK against a live server (the session ``live`` fixture), and its retry
rule against a tiny fake server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from cell_sdk import (
    AuthenticationException,
    CellClient,
    EntryInfo,
    FileType,
    InvalidArgumentException,
    NotFoundException,
    OutputMessage,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    TimeoutException,
)
from cell_sdk._http import parse_retry_after
from cell_sdk._parse import js_error, main_js_result_text, python_error
from cell_sdk.sandbox import execution_from_answer
from tests.liveserver import ServerProcess

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture()
def sbx(live: ServerProcess) -> Iterator[Sandbox]:
    with Sandbox(api_url=live.url, api_key=live.api_key) as s:
        yield s


def opts(live: ServerProcess) -> dict[str, str]:
    return {"api_url": live.url, "api_key": live.api_key}


# -- lifecycle ---------------------------------------------------------------
def test_create_connect_info_list_timeout_kill(live: ServerProcess) -> None:
    sbx = Sandbox.create("python3", timeout=120, metadata={"who": "test"}, **opts(live))
    assert sbx.sandbox_id and sbx.template == "python3"
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.metadata == {"who": "test"} and info.timeout_ms == 120_000
    sbx.set_timeout(600)
    assert sbx.get_info().timeout_ms == 600_000
    Sandbox.set_timeout(sbx.sandbox_id, 300, **opts(live))
    assert Sandbox.get_info(sbx.sandbox_id, **opts(live)).timeout_ms == 300_000
    assert sbx.sandbox_id in {i.sandbox_id for i in Sandbox.list(**opts(live))}
    sbx.run_code("kept = 7")
    other = Sandbox.connect(sbx.sandbox_id, **opts(live))
    assert other.run_code("kept * 6").text == "42"
    assert sbx.is_running()
    assert sbx.kill() is True
    assert not other.is_running()
    other.close()
    sbx.close()
    assert Sandbox.kill(sbx.sandbox_id, **opts(live)) is False


def test_env_vars_are_the_defaults(live: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELL_API_URL", live.url)
    monkeypatch.setenv("CELL_API_KEY", live.api_key)
    with Sandbox() as sbx:
        assert sbx.run_code("1+1").text == "2"


def test_context_manager_kills(live: ServerProcess) -> None:
    with Sandbox(**opts(live)) as sbx:
        sid = sbx.sandbox_id
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sid, **opts(live))


# -- run_code ----------------------------------------------------------------
def test_state_persists_and_last_expression_is_the_result(sbx: Sandbox) -> None:
    assert sbx.run_code("x = 1").results == []
    ex = sbx.run_code("x + 1")
    assert ex.text == "2" and ex.logs.stdout == ["2\n"] and ex.error is None and ex.status == "ok"
    assert ex.results[0].is_main_result and ex.results[0].formats() == ["text"]
    assert sbx.run_code("print('a')\nx + 5").text == "6"
    assert sbx.run_code("print('only')").results == []
    assert ex.execution_count is not None and sbx.run_code("x").execution_count == ex.execution_count + 3


def test_multiline_repr_is_whole(sbx: Sandbox) -> None:
    ex = sbx.run_code("[[i] * 2 for i in range(3)]\n{'a': 1}")
    assert ex.text == "{'a': 1}"
    ex = sbx.run_code("import numpy as np\nnp.arange(6).reshape(3, 2)")
    assert ex.text == "array([[0, 1],\n       [2, 3],\n       [4, 5]])"


def test_python_exception_parsed(sbx: Sandbox) -> None:
    ex = sbx.run_code("def f():\n    return 1 / 0\nf()")
    assert ex.status == "error" and ex.exit_code == 1 and ex.results == []
    assert ex.error is not None
    assert (ex.error.name, ex.error.value) == ("ZeroDivisionError", "division by zero")
    assert ex.error.traceback.startswith("Traceback (most recent call last):")


def test_javascript_value_and_error(live: ServerProcess) -> None:
    with Sandbox("javascript", **opts(live)) as js:
        mapped = js.run_code("let a = [1, 2]; a.map(v => v * 3)")  # an array: a JSON main result
        assert mapped.text == "[3,6]" and mapped.results[0].data == [3, 6] and mapped.logs.stdout == ["3,6\n"]
        assert js.run_code("a.length + 1").text == "3"  # state persists
        ex = js.run_code("throw new Error('boom')")
        assert ex.error is not None and (ex.error.name, ex.error.value) == ("Error", "boom")
        assert js.run_code("console.log('hi')").results == []


def test_wasm_cell_runs_wat(live: ServerProcess) -> None:
    wat = '(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))'
    with Sandbox("wasm", **opts(live)) as w:
        ex = w.run_code(wat)
        assert ex.status == "ok" and ex.receipt_matches(wat)


def test_streaming_callbacks_fire_as_output_arrives(sbx: Sandbox) -> None:
    seen: list[tuple[str, bool]] = []
    code = "import sys, time\nprint('one', flush=True)\ntime.sleep(0.3)\nprint('err', file=sys.stderr, flush=True)\nprint('two')"
    ex = sbx.run_code(code, on_stdout=lambda m: seen.append((m.line, m.error)), on_stderr=lambda m: seen.append((m.line, m.error)))
    assert seen[0] == ("one\n", False)
    assert ("err\n", True) in seen
    assert "".join(line for line, err in seen if not err) == ex.stdout == "one\ntwo\n"
    assert ex.receipt_matches(code)


def test_streamed_message_type(sbx: Sandbox) -> None:
    msgs: list[OutputMessage] = []
    sbx.run_code("print(3)", on_stdout=msgs.append)
    assert msgs and isinstance(msgs[0], OutputMessage) and str(msgs[0]) == "3\n" and msgs[0].timestamp > 0


def test_run_timeout_raises_with_its_execution_and_receipt(sbx: Sandbox) -> None:
    # As E2B's run_code: a run that hits its limit raises; the run is still answered and receipted.
    with pytest.raises(TimeoutException) as info:
        sbx.run_code("while True: pass", timeout=0.5)
    ex = info.value.execution
    assert ex is not None and ex.status == "timeout" and ex.error is not None and ex.error.name == "TimeoutError"
    assert ex.receipt["execution_id"] == ex.execution_id


def test_receipt_is_stored_and_matches(live: ServerProcess, sbx: Sandbox) -> None:
    code = "print('receipt')"
    ex = sbx.run_code(code)
    assert ex.receipt_matches(code) and not ex.receipt_matches(code + " ")
    stored = sbx.get_receipt(ex.execution_id)
    assert stored["receipt_hash"] == ex.receipt["receipt_hash"]
    with CellClient(**opts(live)) as client:
        assert client.get_receipt(ex.execution_id)["receipt_hash"] == ex.receipt["receipt_hash"]
        assert client.verify_receipts()["ok"] is True
        assert client.list_receipts(limit=5)["receipts"]


def test_language_mismatch_refused_before_sending(sbx: Sandbox) -> None:
    with pytest.raises(InvalidArgumentException):
        sbx.run_code("1", language="javascript")
    assert sbx.run_code("1", language="python").text == "1"


def test_one_shot_execute_and_status(live: ServerProcess) -> None:
    with CellClient(**opts(live)) as client:
        ex = client.execute("print(6 * 7)")
        assert ex.stdout == "42\n" and ex.receipt_matches("print(6 * 7)")
        assert client.execute("1 + 1", template="javascript").text == "2"
        assert client.execute("import os; os.environ['A']", envs={"A": "run"}).text == "'run'"
        assert client.execute("process.env.A", template="javascript", envs={"A": "run"}).text == "run"
        with pytest.raises(InvalidArgumentException):
            client.execute("1", envs={"1BAD": "x"})
        assert "python3" in client.status()["templates"]
        assert {t["name"] for t in client.templates()} >= {"python3", "javascript", "wasm"}


# -- files -------------------------------------------------------------------
def test_files_roundtrip(sbx: Sandbox) -> None:
    info = sbx.files.write("/data/dir/a.txt", "hello")
    assert (info.name, info.type, info.path) == ("a.txt", FileType.FILE, "dir/a.txt")
    assert sbx.files.read("dir/a.txt") == "hello"
    assert sbx.files.read("/data/dir/a.txt", format="bytes") == b"hello"
    sbx.files.write("bin.dat", b"\x00\xff\x10")
    assert sbx.files.read("bin.dat", format="bytes") == b"\x00\xff\x10"
    assert sbx.run_code("open('/data/dir/a.txt').read()").text == "'hello'"
    assert sbx.files.exists("dir/a.txt") and not sbx.files.exists("nope.txt")
    assert sbx.files.make_dir("sub/deeper") is True and sbx.files.make_dir("sub/deeper") is False
    moved = sbx.files.rename("dir/a.txt", "sub/b.txt")
    assert isinstance(moved, EntryInfo) and moved.path == "sub/b.txt" and moved.size == 5
    names = {e.name for e in sbx.files.list("/")}
    assert {"dir", "bin.dat", "sub"} <= names
    deep = {e.path for e in sbx.files.list("", depth=3)}
    assert {"sub/b.txt", "sub/deeper"} <= deep
    assert sbx.files.get_info("sub").type == FileType.DIR and sbx.files.get_info("sub/b.txt").modified_time is not None
    sbx.files.remove("sub")
    assert not sbx.files.exists("sub/b.txt")
    with pytest.raises(NotFoundException):
        sbx.files.read("sub/b.txt")
    with pytest.raises(InvalidArgumentException):
        sbx.files.read("../../etc/passwd")


# -- errors ------------------------------------------------------------------
def test_bad_key_is_authentication_error(live: ServerProcess) -> None:
    with pytest.raises(AuthenticationException) as exc:
        Sandbox(api_url=live.url, api_key="cell_not_a_key")
    assert exc.value.status == 401


def test_unknown_cell_is_not_found(live: ServerProcess) -> None:
    with pytest.raises(SandboxNotFoundException) as exc:
        Sandbox.connect("c00000000-ffffffffffffffffffff", **opts(live))
    assert exc.value.status == 404 and exc.value.code == "cell_not_found"
    assert Sandbox.kill("c00000000-ffffffffffffffffffff", **opts(live)) is False


def test_bad_template_is_invalid_argument(live: ServerProcess) -> None:
    with pytest.raises(InvalidArgumentException) as exc:
        Sandbox("cobol", **opts(live))
    assert exc.value.status == 400 and exc.value.code == "unknown_template"


# -- pure parsing ------------------------------------------------------------
@pytest.mark.parametrize(("stderr", "name", "value"), [
    ("Traceback (most recent call last):\n  File \"<turn 1>\", line 1, in <module>\nKeyError: 'k'\n", "KeyError", "'k'"),
    ("Traceback (most recent call last):\n  File \"x\", line 2\nKeyboardInterrupt\n", "KeyboardInterrupt", ""),
    ("  File \"<turn 3>\", line 1\n    x = \n        ^\nSyntaxError: invalid syntax\n", "SyntaxError", "invalid syntax"),
    ("noise\nTraceback (most recent call last):\n  File \"a\", line 1\npandas.errors.ParserError: bad\n", "pandas.errors.ParserError", "bad"),
])
def test_python_traceback_parse(stderr: str, name: str, value: str) -> None:
    err = python_error(stderr)
    assert err is not None and (err.name, err.value) == (name, value)


def test_js_error_parse() -> None:
    err = js_error("log line\nTypeError: not a function\n    at f (<evalScript>:1:25)\n\n")
    assert err is not None and (err.name, err.value) == ("TypeError", "not a function")


@pytest.mark.parametrize(("code", "stdout", "text"), [
    ("x", "1\n", "1"), ("let x = 1", "", None), ("console.log(1)", "1\n", None),
    ("console.log(1); 2", "1\n2\n", "2"), ("}", "", None),
])
def test_javascript_main_result_rules(code: str, stdout: str, text: str | None) -> None:
    assert main_js_result_text(code, stdout, "ok") == text


def test_python_results_come_from_the_answer_not_from_stdout() -> None:
    # A Python run whose stdout looks like an echo but whose answer has no results: none are invented.
    answer = {"stdout": "2\n", "stderr": "", "status": "ok", "exit_code": 0, "results": []}
    assert execution_from_answer(answer, "python3", "1 + 1", 1).results == []
    answer["results"] = [{"text/plain": "2", "is_main_result": True},
                         {"text/plain": "<Figure>", "image/png": "iVBORw0K", "is_main_result": False},
                         {"text/plain": "df", "text/html": "<table/>", "application/json": '[{"a": 1}]',
                          "is_main_result": False}]
    ex = execution_from_answer(answer, "python3", "1 + 1", 1)
    main, chart, table = ex.results
    assert ex.text == "2" and main.formats() == ["text"]
    assert chart.png == "iVBORw0K" and chart.formats() == ["text", "png"] and not chart.is_main_result
    assert table.html == "<table/>" and table.data == [{"a": 1}] and table.json == [{"a": 1}]
    assert table.formats() == ["text", "html", "json"]


def test_retry_after_forms() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0) == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


# -- retries, against a fake server --------------------------------------------
class _Fake:
    """Scripted answers per (method, path prefix); records every request."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Any]] = {}
        self.seen: list[tuple[str, str]] = []
        self.clients: list[Sandbox] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                fake.seen.append((self.command, self.path))
                key = next(k for k in fake.script if k[0] == self.command and self.path.startswith(k[1]))
                step = fake.script[key].pop(0) if len(fake.script[key]) > 1 else fake.script[key][0]
                if step == "drop":  # the request arrived, then the connection dies
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, body, headers = step
                data = json.dumps(body).encode()
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.server.shutdown()
        self.server.server_close()


CELL = {"cell_id": "c1-abc", "template": "python3", "created_at": 1, "timeout_ms": 1000, "status": "running"}
RUN = {"execution_id": "e", "stdout": "2\n", "stderr": "", "exit_code": 0, "status": "ok", "latency_ms": 1.0,
       "truncated": False, "receipt": {}, "results": [{"text/plain": "2", "is_main_result": True}]}
BUSY = (503, {"error": "every worker is busy and the queue is full", "code": "busy"}, {"Retry-After": "0"})


@pytest.fixture()
def fake() -> Iterator[_Fake]:
    f = _Fake()
    yield f
    f.close()


def _attached(fake: _Fake) -> Sandbox:
    fake.script[("GET", "/v1/cells/c1-abc")] = [(200, CELL, {})]
    sbx = Sandbox.connect("c1-abc", api_url=fake.url, api_key="k", retries=3)
    fake.clients.append(sbx)
    return sbx


def test_get_retried_after_503_with_retry_after(fake: _Fake) -> None:
    fake.script[("GET", "/v1/cells/c1-abc")] = [BUSY, BUSY, (200, CELL, {})]
    sbx = Sandbox.connect("c1-abc", api_url=fake.url, api_key="k")
    fake.clients.append(sbx)
    assert sbx.sandbox_id == "c1-abc" and len(fake.seen) == 3


def test_get_retried_after_dropped_connection(fake: _Fake) -> None:
    fake.script[("GET", "/v1/cells/c1-abc")] = ["drop", (200, CELL, {})]
    sbx = Sandbox.connect("c1-abc", api_url=fake.url, api_key="k")
    fake.clients.append(sbx)
    assert sbx.sandbox_id == "c1-abc"
    assert len(fake.seen) == 2


def test_exec_not_resent_after_dropped_connection(fake: _Fake) -> None:
    sbx = _attached(fake)
    fake.script[("POST", "/v1/cells/c1-abc/exec")] = ["drop", (200, RUN, {})]
    with pytest.raises(SandboxException) as exc:
        sbx.run_code("x + 1")
    assert "not sent again" in str(exc.value)
    assert [p for m, p in fake.seen if m == "POST"] == ["/v1/cells/c1-abc/exec"]


@pytest.mark.parametrize("status", [500, 502, 504])
def test_exec_not_resent_after_server_failure(fake: _Fake, status: int) -> None:
    sbx = _attached(fake)
    fake.script[("POST", "/v1/cells/c1-abc/exec")] = [(status, {"error": "x", "code": "internal"}, {}), (200, RUN, {})]
    with pytest.raises(SandboxException):
        sbx.run_code("x + 1")
    assert sum(1 for m, _ in fake.seen if m == "POST") == 1


def test_exec_resent_only_when_refused_with_retry_after(fake: _Fake) -> None:
    # 503 + Retry-After from Cell means the run was refused before it started.
    sbx = _attached(fake)
    fake.script[("POST", "/v1/cells/c1-abc/exec")] = [BUSY, (200, RUN, {})]
    assert sbx.run_code("x + 1").text == "2"
    assert sum(1 for m, _ in fake.seen if m == "POST") == 2


def test_exec_503_without_retry_after_not_resent(fake: _Fake) -> None:
    sbx = _attached(fake)
    fake.script[("POST", "/v1/cells/c1-abc/exec")] = [(503, {"error": "down", "code": "busy"}, {}), (200, RUN, {})]
    with pytest.raises(RateLimitException):
        sbx.run_code("x + 1")
    assert sum(1 for m, _ in fake.seen if m == "POST") == 1


def test_rate_limit_gives_up_with_retry_after(fake: _Fake) -> None:
    fake.script[("GET", "/v1/cells")] = [(429, {"error": "too many", "code": "rate_limited"}, {"Retry-After": "120"})]
    with pytest.raises(RateLimitException) as exc:
        Sandbox.list(api_url=fake.url, api_key="k")
    assert exc.value.retry_after == 120.0 and len(fake.seen) == 1  # over max_retry_wait: not slept on


# -- packaging ---------------------------------------------------------------
@pytest.mark.parametrize("module", ["cell_sdk", "appliance.sdk"])
def test_import_loads_no_server_libraries(module: str) -> None:
    code = (f"import sys, {module}\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flask', 'werkzeug', 'wasmtime', 'textual', 'waitress', 'nacl', 'sqlite_utils'))\n"
            "print(','.join(bad))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "sdk")])}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == ""


def test_old_import_path_gives_the_same_objects() -> None:
    # appliance.sdk (earlier releases) re-exports cell_sdk: same classes, same modules.
    import appliance.sdk
    import appliance.sdk.sandbox
    import cell_sdk
    import cell_sdk.sandbox

    assert appliance.sdk.Sandbox is cell_sdk.Sandbox and appliance.sdk.CellClient is cell_sdk.CellClient
    assert appliance.sdk.sandbox is cell_sdk.sandbox
    assert set(appliance.sdk.__all__) == set(cell_sdk.__all__)
