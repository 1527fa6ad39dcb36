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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance.receipts import envelope, v1
from appliance.receipts import verify as offline
from appliance.receipts.nodekey import NodeKey
from appliance.runtime.protocol import ResultBundle
from appliance.runtime.rich import check_results
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


@pytest.mark.slow
def test_javascript_runs_have_no_results(live: ServerProcess) -> None:
    status, body, _ = live.request("POST", "/v1/execute", {"template": "javascript", "code": "1 + 1"})
    assert status == 200 and body["results"] == [] and body["receipt"]["extensions"] == {}


@pytest.mark.slow
def test_sse_sends_rich_results_before_the_final_result(live: ServerProcess, cell: str) -> None:
    req = urllib.request.Request(f"{live.url}/v1/cells/{cell}/exec/stream", method="POST",
                                 data=json.dumps({"code": "display(1)\nprint('p')\n2", "timeout_ms": LONG}).encode())
    req.add_header("Authorization", f"Bearer {live.api_key}")
    with urllib.request.urlopen(req, timeout=60) as resp:
        events = [json.loads(line[6:]) for line in (raw.decode().strip() for raw in resp) if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds == ["stdout", "stdout", "rich_result", "rich_result", "result"] or \
        kinds == ["stdout", "rich_result", "rich_result", "result"]
    streamed = [e["result"] for e in events if e["type"] == "rich_result"]
    assert streamed == events[-1]["results"] == [{"text/plain": "1", "is_main_result": False},
                                                 {"text/plain": "2", "is_main_result": True}]


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


# -- the host's check of what a guest printed in the collection turn (no guest needed) --
FORGED = [
    pytest.param("not json", id="not-json"),
    pytest.param("[" * 100_000, id="deep-nesting"),
    pytest.param(json.dumps({"results": {"text/plain": "x"}}), id="results-not-a-list"),
    pytest.param(json.dumps({"results": [{"text/plain": 1}]}), id="value-not-text"),
    pytest.param(json.dumps({"results": [{"text/plain": "x", "application/x-evil": "y"}]}), id="unknown-mime"),
    pytest.param(json.dumps({"results": [{"text/plain": "x", "is_main_result": "yes"}]}), id="main-not-bool"),
    pytest.param(json.dumps({"results": [{}]}), id="empty-bundle"),
]


@pytest.mark.parametrize("raw", FORGED)
def test_T_DOS_1_forged_collection_output_is_dropped_and_flagged(raw: str) -> None:
    results, truncated = check_results(raw, 1 << 20, 1 << 20, cut=False)
    assert results == [] and truncated is True


def test_T_DOS_1_host_caps_each_result_the_total_and_the_count() -> None:
    items = [{"text/plain": "a" * 600, "is_main_result": False}] * 3 + [{"text/plain": "b" * 2000}]
    results, truncated = check_results(json.dumps({"results": items}), 1000, 1500, cut=False)
    assert truncated is True
    assert [r.data["text/plain"][:1] for r in results] == ["a", "a", "C", "C"]
    many, cut = check_results(json.dumps({"results": [{"text/plain": "x"}] * 100}), 1 << 20, 1 << 20, cut=False)
    assert len(many) == 64 and cut is True
    assert check_results('{"results": []}', 10, 10, cut=True) == ([], True)  # the capture hit its cap


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
