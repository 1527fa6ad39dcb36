"""End-to-end tests of the v1 API against a real server (waitress + worker
processes) on an ephemeral loopback port."""
from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from tests.liveserver import REPO, ServerProcess

pytestmark = pytest.mark.slow


def new_cell(live: ServerProcess, template: str = "python3", **extra: Any) -> str:
    status, body, _ = live.request("POST", "/v1/cells", {"template": template, **extra})
    assert status == 201, body
    return str(body["cell_id"])


def run(live: ServerProcess, cell: str, code: str, **extra: Any) -> dict[str, Any]:
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/exec", {"code": code, **extra})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def second_tenant(live: ServerProcess) -> str:
    env = dict(os.environ, SYNAPSE_ROOT=str(live.root), SYNAPSE_CONFIG_DIR=str(live.root / "etc"))
    out = subprocess.run([sys.executable, "-m", "appliance.cli", "tenant", "add", "other"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return out.strip().rsplit(" ", 1)[-1]


def test_healthz_needs_no_auth(live: ServerProcess) -> None:
    with urllib.request.urlopen(live.url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}


def test_python_state_kept_across_three_execs(live: ServerProcess) -> None:
    cell = new_cell(live)
    assert run(live, cell, "x = 40")["status"] == "ok"
    assert run(live, cell, "def f(y):\n    return x + y")["status"] == "ok"
    out = run(live, cell, "print(f(2))")
    assert (out["status"], out["stdout"], out["exit_code"]) == ("ok", "42\n", 0)


def test_javascript_state_kept_across_three_execs(live: ServerProcess) -> None:
    cell = new_cell(live, "javascript")
    assert run(live, cell, "let x = 40")["status"] == "ok"
    assert run(live, cell, "function f(y) { return x + y }")["status"] == "ok"
    out = run(live, cell, "console.log(f(2))")
    assert (out["status"], out["stdout"]) == ("ok", "42\n")


def test_numpy_and_pandas_in_a_cell(live: ServerProcess) -> None:
    cell = new_cell(live)
    out = run(live, cell, "import numpy as np, pandas as pd\n"
                          "df = pd.DataFrame({'k': [1, 1, 2], 'v': [1.0, 2.0, 3.0]})\n"
                          "print(np.arange(10).mean(), df.groupby('k').v.sum().to_dict())", timeout_ms=30000)
    assert out["status"] == "ok", out
    assert out["stdout"] == "4.5 {1: 3.0, 2: 3.0}\n"


def test_raw_wat_module(live: ServerProcess) -> None:
    wat = (REPO / "tests" / "wasm" / "hello_wasi.wat").read_text()
    status, body, _ = live.request("POST", "/v1/execute", {"template": "wasm", "code": wat})
    assert status == 200, body
    assert (body["status"], body["stdout"]) == ("ok", "hello from wasm\n")


def test_binary_module_as_code_b64(live: ServerProcess) -> None:
    import wasmtime

    binary = wasmtime.wat2wasm('(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 0))')
    status, body, _ = live.request("POST", "/v1/execute", {"template": "wasm", "code_b64": base64.b64encode(binary).decode()})
    assert status == 200 and body["status"] == "ok", body


def test_files_written_by_api_are_read_by_guest_and_back(live: ServerProcess) -> None:
    cell = new_cell(live)
    status, _, _ = live.request("POST", f"/v1/cells/{cell}/files", {"path": "in/data.csv", "content": "a,b\n1,2\n"})
    assert status == 200
    out = run(live, cell, "print(open('/data/in/data.csv').read().strip()); open('out.txt', 'w').write('from guest')")
    assert out["stdout"].startswith("a,b\n1,2")
    status, body, _ = live.request("GET", f"/v1/cells/{cell}/files?path=out.txt")
    assert (status, body) == (200, {"content": "from guest"})
    status, body, _ = live.request("GET", f"/v1/cells/{cell}/files/list?path=")
    assert {f["name"] for f in body["files"]} == {"in", "out.txt"}
    status, body, _ = live.request("GET", f"/v1/cells/{cell}/files/exists?path=out.txt")
    assert body == {"exists": True}
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/files/rename", {"old_path": "out.txt", "new_path": "renamed.txt"})
    assert status == 200 and body["name"] == "renamed.txt"
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/files/mkdir", {"path": "sub/dir"})
    assert status == 200 and body["type"] == "dir"
    status, body, _ = live.request("DELETE", f"/v1/cells/{cell}/files?path=renamed.txt")
    assert status == 200
    status, body, _ = live.request("GET", f"/v1/cells/{cell}/files/info?path=renamed.txt")
    assert (status, body["code"]) == (404, "file_not_found")


def test_javascript_guest_sees_cell_files(live: ServerProcess) -> None:
    cell = new_cell(live, "javascript")
    live.request("POST", f"/v1/cells/{cell}/files", {"path": "msg.txt", "content": "hi js"})
    out = run(live, cell, "console.log(std.loadFile('/data/msg.txt'))")
    assert out["stdout"] == "hi js\n"


@pytest.mark.parametrize("path", ["../../../../../../etc/passwd", "/etc/passwd", "a/../../x", "/data/../etc/passwd"])
def test_t_path_1_files_api_traversal_refused(live: ServerProcess, path: str) -> None:
    cell = new_cell(live, "wasm")
    status, body, _ = live.request("GET", f"/v1/cells/{cell}/files?path={urllib.request.quote(path)}")
    assert status == 400 and body["code"] in ("bad_path", "path_denied")
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/files", {"path": path, "content": "x"})
    assert status == 400


TRAILING_FILE_FORMS = ["notes.txt/", "notes.txt//", "notes.txt/.", "notes.txt/./", "/data/notes.txt/",
                       "dir/notes.txt/", "dir/notes.txt/."]


def test_t_path_1_files_api_trailing_slash_on_file_refused(live: ServerProcess) -> None:
    # T-PATH-1: "notes.txt/" is 400 not_a_directory (as "notes.txt/x" is), never the file.
    cell = new_cell(live, "wasm")
    files = f"/v1/cells/{cell}/files"
    for path in ("notes.txt", "dir/notes.txt"):
        assert live.request("POST", files, {"path": path, "content": "public"})[0] == 200
    for path in TRAILING_FILE_FORMS:
        q = urllib.request.quote(path, safe="")
        for method, url, body in (("GET", f"{files}?path={q}", None), ("POST", files, {"path": path, "content": "PWNED"}),
                                  ("GET", f"{files}/info?path={q}", None), ("GET", f"{files}/list?path={q}", None),
                                  ("DELETE", f"{files}?path={q}", None),
                                  ("POST", f"{files}/rename", {"old_path": path, "new_path": "moved.txt"})):
            status, answer, _ = live.request(method, url, body)
            assert (status, answer.get("code")) == (400, "not_a_directory"), (method, url, path, answer)
            assert set(answer) == {"error", "code"} and "public" not in json.dumps(answer)
        status, answer, _ = live.request("GET", f"{files}/exists?path={q}")
        assert (status, answer) == (200, {"exists": False})
    for path in ("notes.txt", "dir/notes.txt"):
        assert live.request("GET", f"{files}?path={path}")[1] == {"content": "public"}
    status, listing, _ = live.request("GET", f"{files}/list?path=")
    assert sorted(f["name"] for f in listing["files"]) == ["dir", "notes.txt"]


def test_t_path_1_files_api_trailing_slash_on_directory_works(live: ServerProcess) -> None:
    cell = new_cell(live, "wasm")
    files = f"/v1/cells/{cell}/files"
    status, entry, _ = live.request("POST", f"{files}/mkdir", {"path": "made/"})
    assert (status, entry["type"], entry["path"]) == (200, "dir", "made")
    assert live.request("POST", files, {"path": "made/f.txt", "content": "x"})[0] == 200
    for form in ("made/", "made//", "made/.", "/data/made/"):
        q = urllib.request.quote(form, safe="")
        status, listing, _ = live.request("GET", f"{files}/list?path={q}")
        assert status == 200 and [f["name"] for f in listing["files"]] == ["f.txt"]
        assert live.request("GET", f"{files}/info?path={q}")[1]["type"] == "dir"
        assert live.request("GET", f"{files}/exists?path={q}")[1] == {"exists": True}
        status, answer, _ = live.request("GET", f"{files}?path={q}")
        assert (status, answer["code"]) == (400, "is_a_directory")


def test_sse_stream_delivers_output_before_the_run_ends(live: ServerProcess) -> None:
    cell = new_cell(live)
    req = urllib.request.Request(f"{live.url}/v1/cells/{cell}/exec/stream", method="POST",
                                 data=json.dumps({"code": "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)"}).encode())
    req.add_header("Authorization", f"Bearer {live.api_key}")
    events: list[tuple[float, dict[str, Any]]] = []
    t0 = time.monotonic()
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append((time.monotonic() - t0, json.loads(line[6:])))
    kinds = [e["type"] for _, e in events]
    assert kinds[-1] == "result" and "stdout" in kinds
    first_out = next(t for t, e in events if e["type"] == "stdout")
    assert first_out < events[-1][0] - 0.3  # output arrived while the guest still ran
    assert events[-1][1]["stdout"] == "0\n1\n2\n" and events[-1][1]["receipt"]["schema"] == "v1"


HOSTILE = [
    pytest.param("python3", "while True: pass", "timeout", id="py-infinite-loop"),
    pytest.param("python3", "import time; time.sleep(3600)", "timeout", id="py-sleep-3600"),
    pytest.param("python3", "x = []\nwhile True: x.append(bytearray(10**6))", "memory_limit", id="py-memory-bomb"),
    pytest.param("python3", "while True: print('x' * 10000)", "output_limit", id="py-output-flood"),
    pytest.param("javascript", "while (true) {}", "timeout", id="js-infinite-loop"),
    pytest.param("javascript", "os.sleep(3600 * 1000)", "timeout", id="js-sleep"),
    # fd 0 of a JavaScript cell is the host's command channel: reading it
    # stops the interpreter at once (T-DOS-1, see test_js_end_of_run.py).
    pytest.param("javascript", "std.in.getline()", "error", id="js-reads-stdin"),
    pytest.param("javascript", "while (true) console.log('y'.repeat(10000))", "output_limit", id="js-output-flood"),
]


@pytest.mark.parametrize("template,code,expected", HOSTILE)
def test_t_dos_1_hostile_run_ends_within_limit_while_others_answer(live: ServerProcess, template: str, code: str, expected: str) -> None:
    bad, good = new_cell(live, template), new_cell(live)
    result: dict[str, Any] = {}

    def hostile() -> None:
        t = time.monotonic()
        result.update(run(live, bad, code, timeout_ms=1500))
        result["_elapsed"] = time.monotonic() - t

    th = threading.Thread(target=hostile)
    th.start()
    time.sleep(0.2)
    # Another cell keeps answering while the hostile one runs.
    assert run(live, good, "print('still here')")["stdout"] == "still here\n"
    th.join(timeout=30)
    assert result["status"] == expected, result
    assert result["_elapsed"] < 1.5 + 1.0 + 0.5  # limit + 1 s (+ HTTP slack)
    assert result["receipt"]["receipt_hash"]
    # The cell is usable again afterwards (a fresh interpreter where it trapped).
    after = run(live, bad, "1+1" if template == "python3" else "1+1")
    assert after["status"] == "ok" and after["stdout"] == "2\n"


def test_memory_error_keeps_python_state(live: ServerProcess) -> None:
    cell = new_cell(live)
    run(live, cell, "keep = 7")
    assert run(live, cell, "a = bytearray(1024**3)")["status"] == "memory_limit"
    assert run(live, cell, "print(keep)")["stdout"] == "7\n"


def test_killed_worker_is_replaced_and_its_cells_say_cell_lost(live: ServerProcess) -> None:
    cell = new_cell(live)
    run(live, cell, "v = 1")
    _, status, _ = live.request("GET", "/v1/status")
    pids = status["workers"]["pids"]
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.5)
    code, body, _ = live.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(v)"})
    deadline = time.monotonic() + 60
    while code == 503 and time.monotonic() < deadline:
        time.sleep(0.5)
        code, body, _ = live.request("POST", f"/v1/cells/{cell}/exec", {"code": "print(v)"})
    assert code == 409 and body["code"] == "cell_lost", body
    # While replacements are still settling, a run may land on a worker that is
    # being replaced and be answered "killed" (with its receipt); it then works.
    seen = []
    for _ in range(3):
        out = run(live, cell, "print('fresh')")
        seen.append(out["status"])
        if out["status"] == "ok":
            break
    assert out["stdout"] == "fresh\n" and set(seen) <= {"ok", "killed"}, seen
    _, status, _ = live.request("GET", "/v1/status")
    assert set(status["workers"]["pids"]).isdisjoint(pids)


def test_t_tenant_1_other_tenants_cell_is_404(live: ServerProcess) -> None:
    cell = new_cell(live)
    run(live, cell, "secret = 1")
    other = second_tenant(live)
    for method, path, body in [
        ("GET", f"/v1/cells/{cell}", None),
        ("POST", f"/v1/cells/{cell}/exec", {"code": "print(secret)"}),
        ("GET", f"/v1/cells/{cell}/files/list?path=", None),
        ("POST", f"/v1/cells/{cell}/files", {"path": "x", "content": "y"}),
        ("DELETE", f"/v1/cells/{cell}", None),
        ("PUT", f"/v1/cells/{cell}/timeout", {"timeout_ms": 5000}),
    ]:
        status, answer, _ = live.request(method, path, body, key=other)
        assert status == 404, (method, path, answer)
    status, mine, _ = live.request("GET", "/v1/cells", key=other)
    assert cell not in [c["cell_id"] for c in mine["cells"]]


ERRORS = [
    pytest.param("POST", "/v1/cells", b"{not json", 400, "invalid_json", id="malformed-json"),
    pytest.param("POST", "/v1/cells", b'{"template": "ruby"}', 400, "unknown_template", id="unknown-template"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "timeout_ms": -1}', 400, "out_of_range", id="bad-timeout"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "bogus": 1}', 400, "unknown_field", id="unknown-field"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "envs": []}', 400, "invalid_field", id="create-envs-list"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "envs": false}', 400, "invalid_field", id="create-envs-false"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "metadata": ""}', 400, "invalid_field", id="create-metadata-empty-string"),
    pytest.param("POST", "/v1/cells", b'{"template": "python3", "metadata": 0}', 400, "invalid_field", id="create-metadata-zero"),
    pytest.param("POST", "/v1/execute", b'{"template": "wasm", "code": "(module"}', 400, "invalid_module", id="invalid-module"),
    pytest.param("POST", "/v1/execute", b'{"template": "wasm", "code_b64": "!!!"}', 400, "invalid_base64", id="bad-base64"),
    pytest.param("POST", "/v1/execute", b'[1, 2]', 400, "invalid_json", id="not-an-object"),
    pytest.param("GET", "/v1/cells/nope", None, 404, "cell_not_found", id="unknown-cell"),
    pytest.param("GET", "/v1/receipts/nope", None, 404, "receipt_not_found", id="unknown-receipt"),
    pytest.param("GET", "/v1/nothing-here", None, 404, "not_found", id="unknown-route"),
    pytest.param("POST", "/v1/execute", b'{"template":"wasm","code":"(module (import \\"cell\\" \\"load_weights\\" (func)) (memory (export \\"memory\\") 1) (func (export \\"run\\") (result i32) i32.const 0))"}', 403, "license_required", id="pro-without-license"),
]


@pytest.mark.parametrize("method,path,raw,status,code", ERRORS)
def test_bad_requests_get_clear_errors(live: ServerProcess, method: str, path: str, raw: bytes | None, status: int, code: str) -> None:
    got, body, _ = live.request(method, path, raw=raw)
    assert got == status, body
    assert body == {"error": body["error"], "code": code}


def test_missing_or_bad_key_is_401(live: ServerProcess) -> None:
    status, body, _ = live.request("GET", "/v1/cells", key="cell_not-a-real-key")
    assert (status, body["code"]) == (401, "bad_key")
    req = urllib.request.Request(live.url + "/v1/cells")
    try:
        urllib.request.urlopen(req, timeout=10)
    except urllib.error.HTTPError as e:
        with e:
            assert e.code == 401 and json.loads(e.read())["code"] == "unauthorized"


def test_t_dos_2_body_over_10mb_is_413(live: ServerProcess) -> None:
    status, body, _ = live.request("POST", "/v1/execute", raw=b"{" + b" " * (10 * 1024 * 1024 + 10) + b"}")
    assert (status, body["code"]) == (413, "payload_too_large")


def test_receipt_fields_recompute_and_can_be_fetched(live: ServerProcess) -> None:
    import hashlib

    status, body, _ = live.request("POST", "/v1/execute", {"template": "python3", "code": "print(1+1)"})
    r = body["receipt"]
    result = json.dumps({"exit_code": body["exit_code"], "status": body["status"], "stderr": body["stderr"], "stdout": body["stdout"]},
                        sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert r["result_hash"] == hashlib.sha256(result).hexdigest()
    assert r["code_hash"] == hashlib.sha256(b"print(1+1)").hexdigest()
    line = f"{r['execution_id']}|{r['code_hash']}|{r['result_hash']}|{r['template']}|{r['timestamp']}"
    assert r["receipt_hash"] == hashlib.sha256(line.encode()).hexdigest()
    status, fetched, _ = live.request("GET", f"/v1/receipts/{body['execution_id']}")
    assert status == 200 and fetched["receipt_hash"] == r["receipt_hash"]
    status, verdict, _ = live.request("GET", "/v1/receipts/verify")
    assert verdict["ok"] is True


def test_cell_lifecycle_list_timeout_delete(live: ServerProcess) -> None:
    cell = new_cell(live, "python3", metadata={"owner": "tests"})
    status, body, _ = live.request("GET", f"/v1/cells/{cell}")
    assert body["metadata"] == {"owner": "tests"} and body["status"] == "running"
    status, body, _ = live.request("PUT", f"/v1/cells/{cell}/timeout", {"timeout_ms": 60000})
    assert status == 200 and body["timeout_ms"] == 60000
    status, _, _ = live.request("DELETE", f"/v1/cells/{cell}")
    assert status == 200
    status, body, _ = live.request("GET", f"/v1/cells/{cell}")
    assert status == 404


def test_status_and_templates(live: ServerProcess) -> None:
    _, status, _ = live.request("GET", "/v1/status")
    assert status["tier"] == "free" and status["egress"] == "off" and len(status["node_public_key"]) == 64
    _, templates, _ = live.request("GET", "/v1/templates")
    names = {t["name"]: t for t in templates["templates"]}
    assert set(names) == {"python3", "javascript", "wasm"}
    assert len(names["python3"]["sha256"]) == 64


def test_t_env_1_guest_sees_only_its_own_environment(live: ServerProcess) -> None:
    cell = new_cell(live, "python3", envs={"GREETING": "hello"})
    out = run(live, cell, "import os, sys; print(sorted(os.environ)); print(os.environ['GREETING']); print(sys.stdin.read() == '')")
    listed, greeting, stdin_empty = out["stdout"].splitlines()
    import ast

    assert ast.literal_eval(listed) == ["GREETING", "HOME", "MPLBACKEND", "MPLCONFIGDIR", "PYTHONTZPATH", "TMPDIR"]
    assert greeting == "hello" and stdin_empty == "True"
    out = run(live, cell, "import os; print(os.listdir('/'))")
    assert out["status"] == "error"  # nothing of the host is mounted but /data, /tmp and the read-only stdlib


def test_javascript_cell_envs(live: ServerProcess) -> None:
    cell = new_cell(live, "javascript", envs={"GREETING": "hej"})
    assert run(live, cell, "console.log(std.getenv('GREETING'), std.getenv('PATH'))")["stdout"] == "hej undefined\n"


# A one-shot run's envs are set over its throw-away session's defaults, as an
# exec's are over its cell's: a name given replaces that default (HOME here),
# the others stay (TMPDIR, and Python's MPLBACKEND).
EXECUTE_ENVS = [
    pytest.param({"template": "python3", "code": "import os; e = os.environ; print(e['A'], e['HOME'], e['TMPDIR'], "
                  "e['MPLBACKEND'])"}, "run /over /tmp Agg\n", id="python"),
    # With stdin the worker starts a new session instead of taking a prepared one.
    pytest.param({"language": "python", "stdin": "in", "code": "import os; print(os.environ['A'], os.environ['HOME'])"},
                 "run /over\n", id="python-new-session"),
    pytest.param({"template": "javascript", "code": "console.log(process.env.A, std.getenv('A'), process.env.HOME, "
                  "std.getenv('TMPDIR'))"}, "run run /over /data\n", id="javascript"),
]


@pytest.mark.parametrize("body, stdout", EXECUTE_ENVS)
def test_execute_envs_reach_the_run_over_the_defaults(live: ServerProcess, body: dict[str, Any], stdout: str) -> None:
    status, out, _ = live.request("POST", "/v1/execute", {**body, "envs": {"A": "run", "HOME": "/over"}})
    assert status == 200 and out["status"] == "ok", out
    assert out["stdout"] == stdout
    # The next one-shot run has only the defaults.
    read_a = ("console.log(process.env.A ?? null, process.env.HOME)" if body.get("template") == "javascript"
              else "import os; print(os.environ.get('A'), os.environ['HOME'])")
    status, out, _ = live.request("POST", "/v1/execute", {**body, "code": read_a})
    assert status == 200 and out["stdout"] in ("None /data\n", "null /data\n"), out


def test_t_env_1_execute_envs_refused_for_a_wasm_module(live: ServerProcess) -> None:
    wat = (REPO / "tests" / "wasm" / "hello_wasi.wat").read_text()
    status, body, _ = live.request("POST", "/v1/execute", {"template": "wasm", "code": wat, "envs": {"A": "x"}})
    assert (status, body["code"]) == (400, "invalid_field") and "wasm module" in body["error"]
    status, body, _ = live.request("POST", "/v1/execute", {"template": "wasm", "code": wat, "envs": {}})
    assert (status, body["stdout"]) == (200, "hello from wasm\n"), body  # no envs at all is no refusal


# A one-shot Python run reads the request's stdin; the next run reads nothing.
EXECUTE_STDIN = [
    pytest.param("hello\n", "import sys; print(repr(sys.stdin.read()))", "'hello\\n'\n", id="read-all"),
    pytest.param("first line\nsecond\n", "print(input()); print(input())", "first line\nsecond\n", id="input"),
    pytest.param("héllo ✓", "import sys; print(sys.stdin.read())", "héllo ✓\n", id="utf-8"),
    pytest.param("x" * 100_000, "import sys; print(len(sys.stdin.read()))", "100000\n", id="large"),
]


@pytest.mark.parametrize("stdin, code, stdout", EXECUTE_STDIN)
def test_execute_stdin_reaches_a_python_run(live: ServerProcess, stdin: str, code: str, stdout: str) -> None:
    status, out, _ = live.request("POST", "/v1/execute", {"template": "python3", "code": code, "stdin": stdin})
    assert status == 200 and out["status"] == "ok", out
    assert out["stdout"] == stdout
    status, out, _ = live.request("POST", "/v1/execute", {"template": "python3", "code": "import sys; print(repr(sys.stdin.read()))"})
    assert (status, out["stdout"]) == (200, "''\n"), out


def test_execute_stdin_refused_for_javascript(live: ServerProcess) -> None:
    """A JavaScript session's stdin carries the host's commands: a run's data is refused, not dropped."""
    status, body, _ = live.request("POST", "/v1/execute", {"template": "javascript", "code": "console.log(1)", "stdin": "x"})
    assert (status, body["code"]) == (400, "invalid_field") and "stdin" in body["error"], body


def test_mirror_serves_the_trust_root_read_only(live: ServerProcess) -> None:
    with urllib.request.urlopen(live.url + "/mirror/metadata/root.json", timeout=10) as resp:
        root = json.loads(resp.read())
    assert root["signed"]["_type"] == "root"
    for bad in ("/mirror/", "/mirror/metadata/", "/mirror/../db/cell.sqlite", "/mirror/metadata/..%2f..%2fdb%2fcell.sqlite"):
        try:
            urllib.request.urlopen(live.url + bad, timeout=10)
            raise AssertionError(f"{bad} was served")
        except urllib.error.HTTPError as e:
            with e:
                assert e.code in (400, 404)
    _, status, _ = live.request("GET", "/v1/status")
    assert status["registry"]["root_version"] == 1


@pytest.mark.parametrize("template", ["python3", "javascript"])
def test_memory_too_small_for_the_runtime_is_400(live: ServerProcess, template: str) -> None:
    status, body, _ = live.request("POST", "/v1/cells", {"template": template, "memory_mb": 16})
    assert status in (201, 400), body
    if status == 400:
        assert body["code"] == "memory_too_small"
    status, body, _ = live.request("POST", "/v1/execute", {"template": template, "code": "1", "memory_mb": 16})
    assert status in (200, 400) and (status == 200 or body["code"] == "memory_too_small"), body
