"""Rich results, Jupyter-style, end to end on a live server: a chart comes back
as one PNG of the size asked for, a DataFrame as an HTML table with its
records, display() adds results in order, the IPython.display names work,
results over their caps become a short note (T-DOS-1) and the service keeps
answering, SSE sends them as rich_result events, and a run with results gets
the signed receipt extension results/1 while its v1 hashes stay as before."""
from __future__ import annotations

import base64
import hashlib
import json
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.receipts import envelope, v1
from appliance.receipts import verify as offline
from appliance.receipts.nodekey import NodeKey
from appliance.runtime.protocol import MAX_RESULTS, ResultBundle
from appliance.runtime.results_channel import RunResults
from tests.appliance.test_receipts_v1 import VECTOR_CHAIN_HASH, VECTOR_KEY_ID, VECTOR_RECEIPT_HASH, VECTOR_SEED
from tests.liveserver import ServerProcess

LONG = 60_000  # the first matplotlib/pandas import takes seconds on a busy machine
ROOT = Path(__file__).resolve().parents[2]


def run(live: ServerProcess, cell: str, code: str) -> dict[str, Any]:
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/exec", {"code": code, "timeout_ms": LONG})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def png_size(b64: str) -> tuple[int, int]:
    data = base64.b64decode(b64, validate=True)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


@pytest.fixture(scope="module")
def cell(live: ServerProcess) -> Iterator[str]:
    status, body, _ = live.request("POST", "/v1/cells", {"template": "python3", "memory_mb": 1024})
    assert status == 201, body
    yield str(body["cell_id"])
    live.request("DELETE", f"/v1/cells/{body['cell_id']}")


@pytest.mark.slow
def test_matplotlib_chart_returns_one_png_of_the_requested_size(live: ServerProcess, cell: str) -> None:
    out = run(live, cell, "import matplotlib.pyplot as plt\nplt.figure(figsize=(4, 3), dpi=50)\n"
                          "plt.plot([1, 3, 2])\nplt.title('line')\nplt.show()")
    assert out["status"] == "ok", out["stderr"]
    [chart] = out["results"]
    assert chart["is_main_result"] is False and png_size(chart["image/png"]) == (200, 150)
    assert chart["text/plain"] == "<Figure size 200x150 with 1 Axes>"
    assert "results_truncated" not in out
    # shown and closed: the next run returns nothing more
    assert run(live, cell, "x = 1")["results"] == []


@pytest.mark.slow
def test_figures_left_open_come_back_in_order_after_the_main_result(live: ServerProcess, cell: str) -> None:
    out = run(live, cell, "import matplotlib.pyplot as plt\nfor w in (2, 3):\n    plt.figure(figsize=(w, 1), dpi=100)\n"
                          "    plt.plot([0, w])\n'done'")
    kinds = [(r["is_main_result"], r["text/plain"]) for r in out["results"]]
    assert kinds == [(True, "'done'"), (False, "<Figure size 200x100 with 1 Axes>"),
                     (False, "<Figure size 300x100 with 1 Axes>")]
    assert [png_size(r["image/png"]) for r in out["results"][1:]] == [(200, 100), (300, 100)]


@pytest.mark.slow
def test_dataframe_last_expression_gives_html_table_text_and_records(live: ServerProcess, cell: str) -> None:
    out = run(live, cell, "import pandas as pd\npd.DataFrame({'city': ['Oslo', 'Lima'], 'temp': [4, 19]})")
    assert out["status"] == "ok", out["stderr"]
    [main] = out["results"]
    assert main["is_main_result"] is True and "<table" in main["text/html"]
    assert "Oslo" in main["text/plain"] and out["stdout"].startswith("   city")  # the REPL echo is kept
    assert json.loads(main["application/json"]) == [{"city": "Oslo", "temp": 4}, {"city": "Lima", "temp": 19}]


@pytest.mark.slow
def test_display_of_two_objects_returns_two_results_in_order(live: ServerProcess, cell: str) -> None:
    out = run(live, cell, "display({'a': 1})\ndisplay('second')\nprint('printed')")
    assert [(r["text/plain"], r["is_main_result"]) for r in out["results"]] == [("{'a': 1}", False), ("'second'", False)]
    assert out["stdout"] == "printed\n"


@pytest.mark.slow
def test_ipython_display_names_import_and_work(live: ServerProcess, cell: str) -> None:
    code = ("from IPython.display import display, HTML, Markdown, Latex, JSON, Image\n"
            "from PIL import Image as P\nimport io\nb = io.BytesIO()\nP.new('RGB', (7, 5)).save(b, 'PNG')\n"
            "display(HTML('<b>x</b>'), Markdown('# t'), Latex('$x^2$'), JSON({'k': [1]}), Image(data=b.getvalue()))\n"
            "class R:\n    def _repr_svg_(self):\n        return '<svg/>'\nR()")
    out = run(live, cell, code)
    assert out["status"] == "ok", out["stderr"]
    html, md, latex, js, img, svg = out["results"]
    assert (html["text/html"], md["text/markdown"], latex["text/latex"]) == ("<b>x</b>", "# t", "$x^2$")
    assert json.loads(js["application/json"]) == {"k": [1]} and png_size(img["image/png"]) == (7, 5)
    assert svg["image/svg+xml"] == "<svg/>" and svg["is_main_result"] is True


@pytest.mark.slow
def test_T_DOS_1_results_over_their_caps_become_a_note_and_the_service_keeps_answering(
        live: ServerProcess, cell: str) -> None:
    # A chart whose PNG is far over the 8 MiB per-result cap (noise does not
    # compress), and a 50 MB image: each becomes a short note, the run is ok.
    code = ("import matplotlib.pyplot as plt, numpy as np\nfig = plt.figure(figsize=(10, 10), dpi=200)\n"
            "fig.figimage(np.random.randint(0, 255, (2000, 2000, 3), dtype=np.uint8))\nplt.show()\n"
            "from IPython.display import Image\ndisplay(Image(data=b'\\x89PNG' + bytes(50_000_000)))\n"
            "display('small')")
    out = run(live, cell, code)
    assert out["status"] == "ok" and out["results_truncated"] is True, out["stderr"]
    big_chart, big_image, small = out["results"]
    for note, text in ((big_chart, "<Figure size 2000x2000 with 0 Axes>"), (big_image, "<IPython.core.display.Image object>")):
        assert set(note) == {"text/plain", "is_main_result"}  # the PNG is left out, its text is kept
        assert note["text/plain"].startswith(text + "\n[Cell: result trimmed: its image/png left out")
        assert "over the cap of 8388608 bytes per result]" in note["text/plain"]
    assert small["text/plain"] == "'small'"
    assert run(live, cell, "1 + 1")["results"] == [{"text/plain": "2", "is_main_result": True}]
    assert live.request("GET", "/v1/status")[0] == 200


@pytest.mark.slow
def test_T_DOS_1_a_big_dataframe_keeps_its_table_and_loses_only_its_records(live: ServerProcess, cell: str) -> None:
    out = run(live, cell, f"import pandas as pd\npd.DataFrame({{'a': range(900_000)}})")
    [main] = out["results"]
    assert "<table" in main["text/html"] and "application/json" not in main and out["results_truncated"] is True
    assert "its application/json left out" in main["text/plain"]


JS_VALUES = [
    pytest.param("({city: 'Oslo', temps: [4, 19]})", '{"city":"Oslo","temps":[4,19]}', id="plain-object"),
    pytest.param("await new Promise(r => setTimeout(() => r([1, 'två']), 10))", '[1,"två"]', id="awaited-array"),
    pytest.param("Object.assign(Object.create(null), {k: null})", '{"k":null}', id="null-prototype"),
    pytest.param("1 + 1", None, id="number"),
    pytest.param("'text'", None, id="string"),
    pytest.param("new Map([[1, 2]])", None, id="map"),
    pytest.param("class P {}; new P()", None, id="class-instance"),
    pytest.param("const o = {}; o.self = o; o", None, id="cyclic"),
    pytest.param("({n: 10n})", None, id="bigint"),
]


@pytest.mark.slow
@pytest.mark.parametrize("code,as_json", JS_VALUES)
def test_javascript_plain_object_or_array_is_a_json_main_result(live: ServerProcess, code: str,
                                                                 as_json: str | None) -> None:
    status, body, _ = live.request("POST", "/v1/execute", {"template": "javascript", "code": code})
    assert status == 200 and body["status"] == "ok", body
    if as_json is None:  # other values keep their echo on stdout, and no result
        assert body["results"] == [] and body["receipt"]["extensions"] == {} and body["stdout"]
        return
    [main] = body["results"]
    assert main["is_main_result"] is True and main["application/json"] == as_json
    assert json.loads(main["text/plain"]) == json.loads(as_json)
    canonical = json.dumps(body["results"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert body["receipt"]["extensions"] == {"results/1": {"results_hash": hashlib.sha256(canonical).hexdigest()}}


JS_HOSTILE = [
    pytest.param("'garbage'", id="not-json"),
    pytest.param("'{\"text/plain\": \"x'", id="partial-frame"),
    pytest.param("'{\"text/x-sh\": \"x\"}'", id="unknown-mime"),
    pytest.param("'{\"text/plain\": \"' + 'a'.repeat(9 << 20) + '\"}'", id="over-the-cap"),
]


@pytest.mark.slow
@pytest.mark.parametrize("frame", JS_HOSTILE)
def test_T_DOS_1_javascript_garbage_on_the_result_fd_is_dropped_and_flagged(live: ServerProcess, frame: str) -> None:
    # Guest code writes to the fd the boot uses for the main result: its own content, checked like any result.
    code = f"const f = std.fdopen(0x7FFF0001, 'w'); f.puts({frame}); f.flush(); 'still running'"
    status, body, _ = live.request("POST", "/v1/execute", {"template": "javascript", "code": code, "timeout_ms": 20_000})
    assert status == 200 and body["status"] == "ok" and body["stdout"] == "still running\n", body
    assert body["results"] == [] and body["results_truncated"] is True
    status, body, _ = live.request("POST", "/v1/execute", {"template": "javascript", "code": "[1]"})
    assert status == 200 and body["results"][0]["application/json"] == "[1]"  # the service keeps answering


def stream(live: ServerProcess, cell: str, code: str, on_event: Callable[[dict[str, Any]], None] | None = None,
           timeout_ms: int = LONG) -> list[dict[str, Any]]:
    """The SSE events of one run, each handed to ``on_event`` the moment it is read."""
    req = urllib.request.Request(f"{live.url}/v1/cells/{cell}/exec/stream", method="POST",
                                 data=json.dumps({"code": code, "timeout_ms": timeout_ms}).encode())
    req.add_header("Authorization", f"Bearer {live.api_key}")
    events = []
    with urllib.request.urlopen(req, timeout=90) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
                if on_event is not None:
                    on_event(events[-1])
    return events


@pytest.mark.slow
def test_sse_sends_each_rich_result_as_it_is_shown(live: ServerProcess, cell: str) -> None:
    events = stream(live, cell, "display(1)\nprint('p')\n2")
    kinds = [e["type"] for e in events]
    # Each result as it is shown; the interpreter's stdout is flushed at the end of its turn.
    assert kinds[:2] == ["rich_result", "rich_result"] and kinds[-1] == "result"
    assert set(kinds[2:-1]) == {"stdout"} and "".join(e["text"] for e in events[2:-1]) == "p\n2\n"
    streamed = [e["result"] for e in events if e["type"] == "rich_result"]
    assert [e["index"] for e in events if e["type"] == "rich_result"] == [0, 1]
    assert streamed == events[-1]["results"] == [{"text/plain": "1", "is_main_result": False},
                                                 {"text/plain": "2", "is_main_result": True}]


@pytest.mark.slow
def test_streamed_result_arrives_while_the_run_still_goes(live: ServerProcess, cell: str) -> None:
    # The guest shows one result, then waits for a file the test writes only
    # once that result's event has arrived: a result sent at the end of the
    # run could never let it go on (it would give up and say so).
    code = ("import os, time\ndisplay('first')\nend = time.monotonic() + 20\n"
            "while not os.path.exists('go.txt') and time.monotonic() < end:\n    time.sleep(0.01)\n"
            "print('released' if os.path.exists('go.txt') else 'gave up')\ndisplay('second')\n'last'")
    live.request("DELETE", f"/v1/cells/{cell}/files?path=go.txt")
    seen: list[str] = []

    def on_event(event: dict[str, Any]) -> None:
        seen.append(event["type"])
        if event["type"] == "rich_result" and event["index"] == 0:
            assert "result" not in seen
            status, body, _ = live.request("POST", f"/v1/cells/{cell}/files", {"path": "go.txt", "content": "go"})
            assert status == 200, body

    events = stream(live, cell, code, on_event, timeout_ms=30_000)
    final = events[-1]
    assert final["type"] == "result" and final["status"] == "ok" and final["stdout"] == "released\n'last'\n"
    streamed = [e["result"] for e in events if e["type"] == "rich_result"]
    assert [r["text/plain"] for r in streamed] == ["'first'", "'second'", "'last'"]
    # the answer and its signed results_hash cover exactly what was streamed, in order
    assert final["results"] == streamed
    canonical = json.dumps(streamed, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert final["receipt"]["extensions"]["results/1"]["results_hash"] == hashlib.sha256(canonical).hexdigest()


@pytest.mark.slow
def test_T_RCPT_2_receipt_with_results_keeps_v1_and_signs_results_hash(
        live: ServerProcess, cell: str, tmp_path: Path) -> None:
    out = run(live, cell, "import pandas as pd\ndisplay('shown')\npd.DataFrame({'v': [1]})")
    receipt = out["receipt"]
    # v1: recomputed exactly as before, from the answer alone
    assert receipt["result_hash"] == v1.result_hash(exit_code=out["exit_code"], status=out["status"],
                                                    stderr=out["stderr"], stdout=out["stdout"])
    assert receipt["receipt_hash"] == v1.receipt_hash(
        execution_id=receipt["execution_id"], code_hash=receipt["code_hash"], result_hash=receipt["result_hash"],
        template=receipt["template"], timestamp=receipt["timestamp"])
    # results/1: SHA-256 of the canonical JSON of the answer's results
    canonical = json.dumps(out["results"], sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert receipt["extensions"] == {"results/1": {"results_hash": hashlib.sha256(canonical).hexdigest()}}
    stored = live.request("GET", f"/v1/receipts/{receipt['execution_id']}")[1]
    assert stored["extensions"] == receipt["extensions"] and stored["signature"] == receipt["signature"]
    # a run without results: no extension at all
    assert run(live, cell, "y = 2")["receipt"]["extensions"] == {}
    # the offline verifier, as an auditor runs it
    key = live.request("GET", "/v1/status")[1]["node_public_key"]
    path = tmp_path / "answer.json"
    path.write_text(json.dumps(out))
    ok = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", "--answer", str(path), "--public-key", key],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out["results"][0]["text/plain"] = "'edited'"
    path.write_text(json.dumps(out))
    bad = subprocess.run([sys.executable, "-m", "appliance.receipts.verify", "--answer", str(path), "--public-key", key],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "results_hash_mismatch" in bad.stdout
    status, report = live.verify_receipts()
    assert status == 200 and report["ok"] is True, report


# -- a hostile guest on the results channel, live: each frame gets a clear answer --
HOSTILE = [
    pytest.param("P + b'not json'", "b'bad'", id="not-json"),
    pytest.param("P + b'{\"text/plain\": \"x'", "b'bad'", id="partial-frame"),
    pytest.param("P + b'[' * 200_000", "b'bad'", id="deep-nesting"),
    pytest.param("P + b'\\xff\\xfe'", "b'bad'", id="not-utf8"),
    pytest.param("P + b'{\"application/x-evil\": \"y\"}'", "b'bad'", id="unknown-mime"),
    pytest.param("P + b'{\"text/plain\": \"' + b'a' * (9 << 20) + b'\"}'", "b'over 8388608 16777216'",
                 id="over-the-cap"),
    pytest.param("P", "b'bad'", id="empty-frame"),
    pytest.param("P + b'{\"text/plain\": \"\\\\ud800\"}'", "b'bad'", id="lone-surrogate"),
    pytest.param("b'{\"text/plain\": \"x\"}'", "ConnectionRefusedError", id="no-prefix"),
    pytest.param("b'cell-figures/1\\nmore'", "ConnectionRefusedError", id="figures-with-a-tail"),
]


@pytest.mark.slow
@pytest.mark.parametrize("frame,answer", HOSTILE)
def test_T_DOS_1_hostile_result_frames_get_a_clear_answer_and_the_run_goes_on(
        live: ServerProcess, cell: str, frame: str, answer: str) -> None:
    code = (f"import _host\nP = b'cell-result/1\\n'\ntry:\n    print(repr(_host.call({frame})))\n"
            "except OSError as e:\n    print(type(e).__name__)\ndisplay('after')")
    out = run(live, cell, code)
    assert out["status"] == "ok" and out["stdout"] == answer + "\n", out["stderr"]
    assert out["results"] == [{"text/plain": "'after'", "is_main_result": False}]  # the channel still works
    assert out.get("results_truncated") is (None if answer == "ConnectionRefusedError" else True)


@pytest.mark.slow
def test_T_DOS_1_a_flood_of_results_stops_at_the_count_and_the_answer_lists_what_was_kept(
        live: ServerProcess, cell: str) -> None:
    events = stream(live, cell, "import _host\nfor i in range(200):\n    a = _host.call(b'cell-result/1\\n{\"text/plain\": \"%d\"}' % i)\nprint(a)")
    final = events[-1]
    assert final["status"] == "ok" and final["stdout"] == "b'full'\n" and final["results_truncated"] is True
    streamed = [e["result"] for e in events if e["type"] == "rich_result"]
    assert len(streamed) == MAX_RESULTS and final["results"] == streamed
    assert [r["text/plain"] for r in streamed] == [str(i) for i in range(MAX_RESULTS)]


# -- the host's check of each bundle on the results channel (no guest needed) --
FORGED = [
    pytest.param(b"not json", id="not-json"),
    pytest.param(b'{"text/plain": "x', id="partial-frame"),
    pytest.param(b"[" * 100_000, id="deep-nesting"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(json.dumps([{"text/plain": "x"}]).encode(), id="not-an-object"),
    pytest.param(json.dumps({"text/plain": 1}).encode(), id="value-not-text"),
    pytest.param(json.dumps({"text/plain": "x", "application/x-evil": "y"}).encode(), id="unknown-mime"),
    pytest.param(json.dumps({"text/plain": "x", "is_main_result": "yes"}).encode(), id="main-not-bool"),
    pytest.param(json.dumps({"text/plain": "x", "trimmed": 1}).encode(), id="trimmed-not-bool"),
    pytest.param(b"{}", id="empty-bundle"),
    pytest.param(b'{"text/plain": "\\ud800"}', id="lone-surrogate"),
]


@pytest.mark.parametrize("frame", FORGED)
def test_T_DOS_1_forged_result_frames_are_refused_and_flagged(frame: bytes) -> None:
    streamed: list[Any] = []
    shown = RunResults(1 << 20, 1 << 20, lambda i, b: streamed.append(b))
    assert shown.add(frame) == b"bad"
    assert shown.items == streamed == [] and shown.truncated is True
    assert shown.add(b'{"text/plain": "ok"}') == b""  # the channel keeps working after garbage
    assert streamed == shown.items == [ResultBundle({"text/plain": "ok"})]


def test_T_DOS_1_host_caps_each_result_the_total_and_the_count() -> None:
    shown = RunResults(1000, 1500)
    small = json.dumps({"text/plain": "a" * 600}).encode()
    assert shown.admit(1001) == b"over 1000 1500"  # refused by its length, before it is read
    assert [shown.add(small) for _ in range(3)] == [b"", b"", b"over 1000 %d" % (1500 - 2 * len(small))]
    assert shown.truncated is True and len(shown.items) == 2 and shown.total == 2 * len(small)
    many = RunResults(1 << 20, 1 << 20)
    answers = [many.add(b'{"text/plain": "x"}') for _ in range(MAX_RESULTS + 2)]
    assert answers == [b""] * MAX_RESULTS + [b"full", b"full"] and len(many.items) == MAX_RESULTS
    trimmed = RunResults(1 << 20, 1 << 20)
    assert trimmed.add(b'{"text/plain": "note", "trimmed": true, "is_main_result": true}') == b""
    assert trimmed.items == [ResultBundle({"text/plain": "note"}, True)] and trimmed.truncated is True


# docs/receipts.md, "Rich results (results/1)": the test vector.
VECTOR_RESULTS = [{"text/plain": "2", "is_main_result": True}]
VECTOR_CANONICAL = '[{"is_main_result":true,"text/plain":"2"}]'
VECTOR_HASH = "78230334e5fcce39806deb6a7ac353318cd53aeb5eab1fd03ff323917999b58c"


def test_results_extension_matches_the_documented_vector() -> None:
    assert json.dumps(VECTOR_RESULTS, sort_keys=True, separators=(",", ":")) == VECTOR_CANONICAL
    assert envelope.results_hash(VECTOR_RESULTS) == offline.results_hash(VECTOR_RESULTS) == VECTOR_HASH
    assert envelope.results_extension(VECTOR_RESULTS) == {"results/1": {"results_hash": VECTOR_HASH}}
    assert envelope.results_extension([]) == {}
    doc = (ROOT / "docs" / "receipts.md").read_text()
    assert VECTOR_CANONICAL in doc and VECTOR_HASH in doc
    assert ResultBundle({"text/plain": "x"}).is_main_result is False


def test_T_RCPT_2_results_envelope_vector_is_signed_as_documented() -> None:
    message = envelope.envelope_message(seq=1, receipt_hash=VECTOR_RECEIPT_HASH, chain_hash=VECTOR_CHAIN_HASH,
                                        tenant_id="default", cell_id="cell-0a1b2c3d", key_id=VECTOR_KEY_ID,
                                        extensions=envelope.results_extension(VECTOR_RESULTS))
    signature = base64.b64encode(NodeKey.from_seed(VECTOR_SEED).sign(message)).decode()
    doc = (ROOT / "docs" / "receipts.md").read_text()
    assert message.decode() in doc and signature in doc
    assert signature == "ileLpo1axZdnOQUBvwe2uAoss5kxVrqW7Z/TthdOFtCo9AdU/zsP2q3bhedCf/DcszEYqzIzf/gVXyziDlENCA=="


@pytest.mark.parametrize("bad", [{"results_hash": "X" * 64}, {"results_hash": "0" * 64, "more": 1}, "0" * 64, {}],
                         ids=["not-hex", "extra-field", "not-an-object", "empty"])
def test_T_RCPT_2_malformed_results_extension_is_refused(bad: Any) -> None:
    with pytest.raises(v1.ReceiptFieldError):
        envelope.check_extensions({"results/1": bad})


@pytest.mark.slow
def test_sdk_fills_e2b_results_from_the_answer(live: ServerProcess) -> None:
    from cell_sdk import Sandbox

    seen: list[Any] = []
    with Sandbox("python3", api_url=live.url, api_key=live.api_key) as sbx:
        ex = sbx.run_code("import matplotlib.pyplot as plt, pandas as pd\nplt.figure(figsize=(2, 2), dpi=50)\n"
                          "plt.plot([1, 2])\nplt.show()\npd.DataFrame({'a': [1, 2]})", timeout=60)
        chart, table = ex.results
        assert chart.formats() == ["text", "png"] and png_size(chart.png or "") == (100, 100)
        assert table.is_main_result and "<table" in (table.html or "") and table.data == [{"a": 1}, {"a": 2}]
        assert ex.text == table.text and set(table.formats()) == {"text", "html", "json"}
        streamed = sbx.run_code("display('x')\nprint('p')", on_stdout=lambda m: None, on_result=seen.append)
        assert [r.text for r in seen] == ["'x'"] and [r.text for r in streamed.results] == ["'x'"]


@pytest.mark.slow
def test_sdk_on_result_alone_streams_each_result_while_the_run_goes(live: ServerProcess) -> None:
    from cell_sdk import Sandbox

    # As test_streamed_result_arrives_while_the_run_still_goes, through the SDK:
    # on_result (no output callback) gets the first result while the guest waits for it.
    code = ("import os, time\ndisplay('first')\nend = time.monotonic() + 20\n"
            "while not os.path.exists('go.txt') and time.monotonic() < end:\n    time.sleep(0.01)\n"
            "print('released' if os.path.exists('go.txt') else 'gave up')\ndisplay('second')")
    seen: list[str | None] = []
    with Sandbox("python3", api_url=live.url, api_key=live.api_key) as sbx:
        def on_result(result: Any) -> None:
            seen.append(result.text)
            if len(seen) == 1:
                sbx.files.write("go.txt", "go")

        ex = sbx.run_code(code, on_result=on_result, timeout=30)
        assert ex.logs.stdout == ["released\n"] and seen == ["'first'", "'second'"]
        assert [r.text for r in ex.results] == seen
    with Sandbox("javascript", api_url=live.url, api_key=live.api_key) as js:
        main = js.run_code("({rows: [1, 2]})").results
        assert len(main) == 1 and main[0].is_main_result and main[0].data == {"rows": [1, 2]}
        assert "json" in main[0].formats()
