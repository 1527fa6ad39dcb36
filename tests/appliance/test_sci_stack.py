"""The scientific stack as a new user meets it, end to end on a live server:
every package the README and the migration guide name is imported and does
one real thing; matplotlib draws to /tmp and /data; each Python cell has its
own /tmp (kept across runs, counted in the quota, removed with the cell);
deep recursion in C code raises RecursionError and keeps the cell's
variables; a trap that still happens is named in stderr."""
from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.liveserver import ServerProcess

pytestmark = pytest.mark.slow

LONG = 60_000  # first imports of sklearn/matplotlib take seconds on a busy machine


def new_cell(live: ServerProcess, template: str = "python3", **extra: Any) -> str:
    status, body, _ = live.request("POST", "/v1/cells", {"template": template, **extra})
    assert status == 201, body
    return str(body["cell_id"])


def run(live: ServerProcess, cell: str, code: str, timeout_ms: int = LONG) -> dict[str, Any]:
    status, body, _ = live.request("POST", f"/v1/cells/{cell}/exec", {"code": code, "timeout_ms": timeout_ms})
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def ok(live: ServerProcess, cell: str, code: str) -> str:
    out = run(live, cell, code)
    assert (out["status"], out["exit_code"]) == ("ok", 0), out["stderr"][-2000:]
    return str(out["stdout"])


def used_bytes(live: ServerProcess) -> int:
    status, body, _ = live.request("GET", "/v1/status")
    assert status == 200, body
    return int(body["quota"]["used_bytes"])


@pytest.fixture(scope="module")
def sci_cell(live: ServerProcess) -> Iterator[str]:
    cell = new_cell(live)
    yield cell
    live.request("DELETE", f"/v1/cells/{cell}")


# -- 1. every package the README / migration guide names does one real thing ----
PACKAGES = [
    pytest.param("import numpy as np\nprint(int(np.linalg.solve([[2, 0], [0, 4]], [2, 8]).sum()))", "3", id="numpy"),
    pytest.param("import pandas as pd\ndf = pd.DataFrame({'k': list('abab'), 'v': [1, 2, 3, 4]})\n"
                 "print(df.groupby('k')['v'].sum().to_dict())", "{'a': 4, 'b': 6}", id="pandas"),
    pytest.param("from scipy import stats\nr = stats.ttest_ind([1, 2, 3, 4], [3, 4, 5, 6])\n"
                 "print(round(float(r.statistic), 4), round(float(r.pvalue), 4))", "-2.1909 0.071", id="scipy"),
    pytest.param("from sklearn.datasets import load_iris, load_digits\nfrom sklearn.linear_model import LogisticRegression\n"
                 "X, y = load_iris(return_X_y=True)\nm = LogisticRegression(max_iter=500).fit(X, y)\n"
                 "print(X.shape, m.score(X, y) > 0.9, load_digits().images.shape)", "(150, 4) True (1797, 8, 8)",
                 id="scikit-learn"),
    pytest.param("import numpy as np, statsmodels.api as sm\nx = np.arange(20.0)\ny = 3 * x + 2\n"
                 "print([round(float(p), 3) for p in sm.OLS(y, sm.add_constant(x)).fit().params])", "[2.0, 3.0]",
                 id="statsmodels"),
    pytest.param("from lxml import etree\ndoc = etree.fromstring('<r><i n=\"1\">a</i><i n=\"2\">b</i></r>')\n"
                 "print(doc.xpath('//i[@n=\"2\"]/text()'))", "['b']", id="lxml"),
    pytest.param("from PIL import Image\nim = Image.new('RGB', (40, 30), (255, 0, 0))\nim.save('/tmp/red.png')\n"
                 "back = Image.open('/tmp/red.png')\nprint(back.size, back.getpixel((5, 5)))", "(40, 30) (255, 0, 0)",
                 id="pillow"),
    pytest.param("import matplotlib\nfrom matplotlib import font_manager\n"
                 "font = font_manager.findfont('DejaVu Sans', fallback_to_default=False)\n"
                 "print(matplotlib.get_backend().lower(), matplotlib.get_cachedir(), "
                 "font.startswith(matplotlib.get_data_path()))", "agg /tmp/.matplotlib True", id="matplotlib"),
]


@pytest.mark.parametrize("code,expected", PACKAGES)
def test_readme_package_does_one_real_thing(live: ServerProcess, sci_cell: str, code: str, expected: str) -> None:
    assert ok(live, sci_cell, code).strip() == expected


def test_matplotlib_line_chart_saved_to_tmp_and_data(live: ServerProcess, sci_cell: str) -> None:
    out = ok(live, sci_cell, (
        "import matplotlib.pyplot as plt\n"
        "fig, ax = plt.subplots(figsize=(4, 3))\n"
        "ax.plot([0, 1, 2, 3], [0, 1, 4, 9], label='squares')\n"
        "ax.set_title('a line chart'); ax.legend()\n"
        "fig.savefig('/tmp/plot.png'); fig.savefig('/data/plot.png')\n"
        "t = open('/tmp/plot.png', 'rb').read()\n"
        "print(t[:8] == b'\\x89PNG\\r\\n\\x1a\\n', len(t) > 5000)"))
    assert out.strip() == "True True"
    status, body, _ = live.request("GET", f"/v1/cells/{sci_cell}/files?path=plot.png&encoding=base64")
    assert status == 200, body
    png = base64.b64decode(body["content"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # matplotlib's own files come from the read-only data directory, not from /data.
    status, body, _ = live.request("GET", f"/v1/cells/{sci_cell}/files/list?path=")
    assert {f["name"] for f in body["files"]} >= {"plot.png"}
    assert not {f["name"] for f in body["files"]} & {".matplotlib", ".cache", ".config"}


def test_matplotlib_data_is_read_only(live: ServerProcess, sci_cell: str) -> None:
    out = ok(live, sci_cell, (
        "import matplotlib, os\n"
        "rc = os.path.join(matplotlib.get_data_path(), 'matplotlibrc')\n"
        "print(os.path.isfile(rc))\n"
        "try:\n    open(rc, 'a').write('x')\nexcept OSError as e:\n    print('refused', type(e).__name__)"))
    lines = out.split("\n")
    assert lines[0] == "True" and lines[1].startswith("refused")


# -- /tmp: writable, per cell, kept across runs, counted, removed with the cell ---------
def test_t_path_2_tmp_is_writable_private_and_kept_across_runs(live: ServerProcess) -> None:
    a, b = new_cell(live), new_cell(live)
    try:
        assert ok(live, a, "import tempfile, os\nopen('/tmp/mine.csv', 'w').write('x,y\\n1,2\\n')\n"
                           "print(tempfile.gettempdir(), os.environ['TMPDIR'])").strip() == "/tmp /tmp"
        assert ok(live, b, "import os\nprint(sorted(os.listdir('/tmp')))").strip() == "[]"
        assert ok(live, a, "print(open('/tmp/mine.csv').read().split())").strip() == "['x,y', '1,2']"
        # Never reachable through the files API of /data, of this cell or another.
        for cell in (a, b):
            for path in ("/tmp/mine.csv", "../.tmp/mine.csv", "../../.tmp"):
                status, _, _ = live.request("GET", f"/v1/cells/{cell}/files?path={path}")
                assert status in (400, 404)
    finally:
        live.request("DELETE", f"/v1/cells/{a}")
        live.request("DELETE", f"/v1/cells/{b}")


def test_t_path_2_tmp_counts_in_quota_and_goes_with_the_cell(live: ServerProcess) -> None:
    cell = new_cell(live)
    tmp_dir = live.root / "sandbox_volumes" / ".tmp"
    before = used_bytes(live)
    ok(live, cell, "open('/tmp/big.bin', 'wb').write(b'z' * 3_000_000)")
    assert used_bytes(live) - before >= 3_000_000
    found = list(tmp_dir.glob(f"*/{cell}/big.bin"))
    assert len(found) == 1 and found[0].stat().st_size == 3_000_000
    assert live.request("DELETE", f"/v1/cells/{cell}")[0] in (200, 204)
    assert not list(tmp_dir.glob(f"*/{cell}"))
    assert used_bytes(live) - before < 3_000_000


def test_t_path_2_tmp_of_a_one_shot_run_is_removed(live: ServerProcess) -> None:
    tmp_root = live.root / "sandbox_volumes"
    status, body, _ = live.request("POST", "/v1/execute", {
        "template": "python3", "code": "open('/tmp/once.txt', 'w').write('x')\nprint(open('/tmp/once.txt').read())"})
    assert status == 200 and body["stdout"] == "x\n", body
    assert not [p for p in tmp_root.rglob("once.txt")]


# -- 4. a mistake does not kill the interpreter ------------------------------------------
def test_t_dos_1_deep_json_raises_recursion_error_and_keeps_variables(live: ServerProcess) -> None:
    cell = new_cell(live)
    try:
        ok(live, cell, "kept = 41")
        out = run(live, cell, "import json\nl = []\nfor _ in range(100_000):\n    l = [l]\njson.dumps(l)")
        assert out["status"] == "error" and out["exit_code"] == 1
        assert "RecursionError" in out["stderr"]
        assert "Cell: the Python interpreter crashed" not in out["stderr"]
        assert ok(live, cell, "print(kept + 1)").strip() == "42"
        # Dropping the deep list (and the traceback that holds it) is survived too.
        ok(live, cell, "import sys\nl = None\nsys.last_exc = sys.last_value = sys.last_traceback = None")
        assert ok(live, cell, "print(kept)").strip() == "41"
    finally:
        live.request("DELETE", f"/v1/cells/{cell}")


def test_t_dos_1_deep_python_recursion_raises_recursion_error(live: ServerProcess) -> None:
    cell = new_cell(live)
    try:
        ok(live, cell, "kept = 'still here'")
        for limit in (None, 20_000):
            setup = f"import sys; sys.setrecursionlimit({limit})\n" if limit else ""
            out = run(live, cell, setup + "def f(n):\n    return f(n + 1)\nf(0)")
            assert out["status"] == "error" and "RecursionError" in out["stderr"], out["stderr"][-500:]
            assert ok(live, cell, "print(kept)").strip() == "still here"
    finally:
        live.request("DELETE", f"/v1/cells/{cell}")


def test_t_dos_1_trap_is_named_in_stderr_and_the_cell_recovers(live: ServerProcess) -> None:
    cell = new_cell(live)
    try:
        ok(live, cell, "open('/data/keep.txt', 'w').write('files survive')\nv = 1")
        # Freeing a list nested 400,000 deep recurses in C below any guard: a real trap.
        out = run(live, cell, "l = []\nfor _ in range(400_000):\n    l = [l]\ndel l")
        assert out["status"] == "error" and out["exit_code"] == -1
        assert "stack overflow" in out["stderr"] and "variables are lost" in out["stderr"]
        assert "wasm backtrace" not in out["stderr"]
        after = run(live, cell, "print(open('/data/keep.txt').read(), 'v' in globals())")
        assert (after["status"], after["stdout"]) == ("ok", "files survive False\n")
    finally:
        live.request("DELETE", f"/v1/cells/{cell}")


WASM_TRAPS = [
    pytest.param("(module (memory (export \"memory\") 1) (func (export \"run\") (result i32) unreachable))",
                 "unreachable code reached", id="unreachable"),
    pytest.param("(module (memory (export \"memory\") 1)\n"
                 "  (func (export \"run\") (result i32) (i32.load (i32.const 0x7ffffff0))))",
                 "out-of-bounds memory access", id="out-of-bounds"),
    pytest.param((Path(__file__).resolve().parent.parent / "wasm" / "recurse.wat").read_text(), "stack overflow",
                 id="stack-overflow"),
]


@pytest.mark.parametrize("wat,words", WASM_TRAPS)
def test_t_dos_1_wasm_trap_named_in_plain_words(live: ServerProcess, wat: str, words: str) -> None:
    started = time.monotonic()
    status, body, _ = live.request("POST", "/v1/execute", {"template": "wasm", "code": wat})
    assert status == 200, body
    assert body["status"] == "error" and words in body["stderr"], body["stderr"]
    assert time.monotonic() - started < 60


# -- sandbox limits say what they are ---------------------------------------------------------
LIMITS = [
    pytest.param("import ssl", "has no ssl module", id="ssl"),
    pytest.param("import subprocess\nsubprocess.run(['ls'])", "cannot start processes", id="subprocess"),
    pytest.param("import os\nos.system('ls')", "cannot start processes", id="os-system"),
    pytest.param("import threading\nthreading.Thread(target=print).start()", "has no threads", id="threads"),
    pytest.param("import urllib.request\nurllib.request.urlopen('http://example.com')", "has no network", id="network"),
]


@pytest.mark.parametrize("code,words", LIMITS)
def test_sandbox_limit_is_named_in_the_error(live: ServerProcess, sci_cell: str, code: str, words: str) -> None:
    out = run(live, sci_cell, code)
    assert out["status"] == "error" and f"Cell: this sandbox {words}" in out["stderr"], out["stderr"][-800:]


# -- host-side pieces, without a server ------------------------------------------------------
def test_t_supply_1_mpl_data_is_extracted_again_when_changed(tmp_path: Path) -> None:
    from appliance.runtime import templates

    runtime = templates.find_runtime("python3")
    stdlib = templates.prepare_stdlib_dir(runtime, tmp_path)
    data = templates.prepare_mpl_data(runtime, stdlib, tmp_path)
    assert data is not None and (data / "matplotlibrc").is_file()
    rc = data / "matplotlibrc"
    original = rc.read_bytes()
    font = next(data.glob("fonts/ttf/DejaVuSans.ttf"))
    os.chmod(rc, 0o644)
    rc.write_bytes(b"backend: something-else\n")
    font.unlink()
    font.symlink_to("/etc/passwd")
    (data / "planted.txt").write_text("not from the archive")
    again = templates.prepare_mpl_data(runtime, stdlib, tmp_path)
    assert again == data
    assert rc.read_bytes() == original
    assert not font.is_symlink() and font.read_bytes()[:4] == b"\x00\x01\x00\x00"
    assert not (data / "planted.txt").exists()


def test_t_dos_1_guest_code_never_runs_on_a_small_stack() -> None:
    from appliance.runtime import stack

    seen: list[int | None] = []

    def probe() -> str:
        seen.append(stack.thread_stack_bytes())
        return "ran"

    def small() -> None:
        seen.append(-1 if stack.guest_stack_ok() else 0)
        assert stack.on_guest_stack(probe) == "ran"

    old = threading.stack_size(1 << 20)  # a thread far too small for the guest's 32 MiB
    try:
        t = threading.Thread(target=small)
        t.start()
        t.join()
    finally:
        threading.stack_size(old)
    assert seen[0] == 0  # refused to run there
    size = seen[1]
    assert size is not None and size >= stack.GUEST_THREAD_STACK
    with pytest.raises(ZeroDivisionError):  # errors come back to the caller's thread
        stack.on_guest_stack(lambda: 1 // 0)
