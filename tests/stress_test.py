#!/usr/bin/env python3
"""Release gate: many persistent cells at once, on a real server (SECURITY.md §7).

Opens N cells concurrently (--quick: 50, full: 500) across python3,
javascript and wasm, drives mixed work through the SDK for a fixed time, then
checks that every cell kept its interpreter state and its files, that every
answered run has a stored receipt matching its answer, that the receipt chain
verifies, that no request got a 500 or hung, and that the server's memory
stays bounded. Prints throughput, p50/p99 latency, errors by code and RSS per
cell. Exits non-zero on a correctness failure only, never on a timing.
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for _root in (REPO / "sdk", REPO):  # sdk/: the client SDK's own distribution (cell_sdk)
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from cell_sdk import CellClient, Execution, Sandbox, SandboxException, TimeoutException  # noqa: E402
from tests.liveserver import start_server  # noqa: E402

WAT_HELLO = """(module
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "wasm-ok\\n")
  (func (export "run") (result i32)
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    i32.const 0))"""
MIX = ("python3",) * 5 + ("javascript",) * 3 + ("wasm",) * 2
# A request that takes longer than this is a hang, not a slow answer.
HANG_S = 120.0
# RSS the node may hold per open cell before the run is called unbounded (a
# Python session is tens of MB; this is an order of magnitude above).
RSS_BOUND_PER_CELL = 256 << 20
RSS_BOUND_FIXED = 1 << 30


@dataclass
class CellState:
    index: int
    sbx: Sandbox
    ok_runs: int = 0
    guest_appends: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    execution_ids: list[tuple[str, str]] = field(default_factory=list)  # (execution_id, receipt_hash)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    server_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self, ex: Execution, seconds: float) -> None:
        with self.lock:
            self.latencies.append(seconds)
            self.execution_ids.append((ex.execution_id, str(ex.receipt.get("receipt_hash", ""))))
            if not ex.receipt:
                self.failures.append(f"run {ex.execution_id} answered without a receipt")

    def failed(self, where: str, exc: SandboxException) -> None:
        with self.lock:
            self.errors[f"{exc.status or 'net'}:{exc.code or type(exc).__name__}"] += 1
            if isinstance(exc, TimeoutException) and exc.code == "request_timeout":
                self.hangs.append(f"{where}: {exc}")
            elif exc.status >= 500 and exc.status != 503:
                self.server_errors.append(f"{where}: {exc.status} {exc.code} {exc}")


def tree_rss(pid: int) -> int:
    """RSS in bytes of a process and all its descendants, from /proc."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                todo.extend(int(k) for k in kids)
        except (OSError, ValueError):
            continue
    return total


def summarize_tracebacks(lines: list[str]) -> collections.Counter[tuple[str, str]]:
    """(innermost appliance frame, exception line) of each traceback in a log."""
    found: collections.Counter[tuple[str, str]] = collections.Counter()
    where = ""
    inside = False
    for line in lines:
        if line.startswith("Traceback"):
            inside, where = True, ""
        elif inside and line.lstrip().startswith('File "') and "/appliance/" in line:
            where = line.strip().split("/appliance/", 1)[1].replace('", line ', ":").replace('"', "")
        elif inside and line and not line[0].isspace():
            found[(where, line.strip()[:120])] += 1
            inside = False
    return found


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def work(cell: CellState, rnd: random.Random, tally: Tally) -> None:
    sbx, tmpl = cell.sbx, cell.sbx.template
    if tmpl == "python3":
        append = rnd.random() < 0.3
        code = ("open('/data/log.txt', 'a').write('x')\nacc += 1\nsum(range(2000))" if append
                else "acc += 1\nsum(range(2000))")
        expect = "1999000"
    elif tmpl == "javascript":
        append, code, expect = False, "acc += 1; var s = 0; for (var i = 0; i < 2000; i++) s += i; s", "1999000"
    else:
        append, code, expect = False, WAT_HELLO, None
    started = time.perf_counter()
    try:
        with cell.lock:  # one run at a time per cell, so the counter check is exact
            ex = sbx.run_code(code, timeout=30)
            if ex.status == "ok":
                cell.ok_runs += 1
                cell.guest_appends += int(append)
    except SandboxException as exc:
        tally.failed(f"cell {cell.index} ({tmpl})", exc)
        return
    tally.answered(ex, time.perf_counter() - started)
    if ex.status != "ok":
        tally.errors[f"run:{ex.status}"] += 1
        if ex.status == "error":
            tally.failures.append(f"cell {cell.index} ({tmpl}): run failed: {ex.stderr[-300:]!r}")
    elif expect is not None and ex.text != expect:
        tally.failures.append(f"cell {cell.index} ({tmpl}): expected {expect!r}, got {ex.stdout!r}")
    elif expect is None and ex.stdout != "wasm-ok\n":
        tally.failures.append(f"cell {cell.index} (wasm): stdout {ex.stdout!r}")


def one_shot(client: CellClient, rnd: random.Random, tally: Tally) -> None:
    started = time.perf_counter()
    try:
        ex = client.execute("print(sum(range(100)))")
    except SandboxException as exc:
        tally.failed("one-shot", exc)
        return
    tally.answered(ex, time.perf_counter() - started)
    if ex.stdout != "4950\n":
        tally.failures.append(f"one-shot: stdout {ex.stdout!r} status {ex.status}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50 cells, ~20 s of load")
    ap.add_argument("--cells", type=int, help="number of persistent cells (default 50 quick / 500 full)")
    ap.add_argument("--duration", type=float, help="seconds of mixed load (default 20 quick / 60 full)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent client threads")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    n = args.cells or (50 if args.quick else 500)
    duration = args.duration or (20.0 if args.quick else 60.0)
    workers = max(1, os.cpu_count() or 1)
    per_worker = math.ceil(n / workers) + 8
    server = start_server(env={"SYNAPSE_MAX_CELLS_PER_WORKER": str(per_worker), "SYNAPSE_QUEUE_MAX": "1024"})
    tally = Tally()
    failures = tally.failures
    print(f"stress: server {server.url}, {n} cells, {duration:g} s of load, {args.clients} clients")
    opts = {"api_url": server.url, "api_key": server.api_key, "request_timeout": HANG_S}
    cells: list[CellState] = []
    try:
        rss_start = tree_rss(server.proc.pid)

        # -- open cells concurrently -------------------------------------
        def open_cell(i: int) -> CellState | None:
            tmpl = MIX[i % len(MIX)]
            try:
                sbx = Sandbox(tmpl, timeout=3600, metadata={"stress": str(i)}, **opts)
                if tmpl == "python3":
                    setup = sbx.run_code(f"acc = 0\nstate_tag = 'cell-{i}'")
                elif tmpl == "javascript":
                    setup = sbx.run_code(f"var acc = 0; var state_tag = 'cell-{i}';")
                else:
                    setup = None
                if setup is not None and setup.status != "ok":
                    failures.append(f"cell {i}: setup failed: {setup.stderr[-200:]!r}")
                sbx.files.write("marker.txt", f"cell-{i}")
                return CellState(i, sbx)
            except SandboxException as exc:
                tally.failed(f"open cell {i}", exc)
                return None

        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=min(32, n)) as pool:
            opened = list(pool.map(open_cell, range(n)))
        cells = [c for c in opened if c is not None]
        open_s = time.perf_counter() - t0
        rss_open = tree_rss(server.proc.pid)
        print(f"opened {len(cells)}/{n} cells in {open_s:.1f} s ({len(cells) / open_s:.1f} cells/s)")
        if not cells:
            failures.append("no cell could be opened")

        # -- mixed load for a fixed time ---------------------------------
        stop_at = time.monotonic() + duration
        client = CellClient(server.url, server.api_key, request_timeout=HANG_S)

        def driver(k: int) -> None:
            rnd = random.Random(args.seed * 1000 + k)
            while time.monotonic() < stop_at and cells:
                if rnd.random() < 0.05:
                    one_shot(client, rnd, tally)
                else:
                    work(rnd.choice(cells), rnd, tally)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=driver, args=(k,), daemon=True) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(duration + HANG_S + 30)
            if t.is_alive():
                tally.hangs.append("a client thread did not finish: a request hung")
        load_s = time.perf_counter() - t0
        rss_load = tree_rss(server.proc.pid)
        runs = len(tally.latencies)

        # -- state and files persisted in every cell ---------------------
        def check_cell(cell: CellState) -> None:
            i, sbx = cell.index, cell.sbx
            try:
                if sbx.files.read("marker.txt") != f"cell-{i}":
                    failures.append(f"cell {i}: marker.txt lost or changed")
                if sbx.template == "python3":
                    ex = sbx.run_code("(acc, state_tag, len(open('/data/log.txt').read()) if __import__('os').path.exists('/data/log.txt') else 0)")
                    want = f"({cell.ok_runs}, 'cell-{i}', {cell.guest_appends})"
                    if ex.text != want:
                        failures.append(f"cell {i} (python3): state {ex.text!r}, expected {want}")
                elif sbx.template == "javascript":
                    ex = sbx.run_code("acc + ':' + state_tag")
                    if ex.text != f"{cell.ok_runs}:cell-{i}":
                        failures.append(f"cell {i} (javascript): state {ex.text!r}, expected {cell.ok_runs}:cell-{i}")
                else:
                    ex = sbx.run_code(WAT_HELLO)
                    if ex.stdout != "wasm-ok\n":
                        failures.append(f"cell {i} (wasm): {ex.stdout!r}")
                tally.answered(ex, 0.0)
            except SandboxException as exc:
                tally.failed(f"check cell {i}", exc)
                failures.append(f"cell {i}: check failed: {exc}")

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(check_cell, cells))

        # -- every answered run has its receipt; the chain verifies ------
        missing: list[str] = []

        def check_receipt(item: tuple[str, str]) -> None:
            eid, rhash = item
            try:
                stored = client.get_receipt(eid)
            except SandboxException as exc:
                missing.append(f"{eid}: {exc.status} {exc.code}")
                return
            if stored.get("receipt_hash") != rhash:
                missing.append(f"{eid}: stored receipt_hash differs from the answer's")

        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(check_receipt, list(tally.execution_ids)))
        failures.extend(f"receipt {m}" for m in missing[:20])
        if len(missing) > 20:
            failures.append(f"... and {len(missing) - 20} more receipts missing")
        verdict = client.verify_receipts()
        if verdict.get("ok") is not True:
            failures.append(f"receipt chain does not verify: {verdict}")

        # -- /metrics, scraped from loopback, must count what happened -----
        import urllib.request

        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as resp:
            exposition = resp.read().decode()
        metric_runs = sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                          if line.startswith("cell_runs_total{"))
        metric_receipts = sum(float(line.rsplit(" ", 1)[1]) for line in exposition.splitlines()
                              if line.startswith("cell_receipts_written_total "))
        # This run's only tenant owns every receipt, so its verified count is the chain's.
        chain_count = int(verdict.get("receipts", -1))
        print(f"metrics:         cell_runs_total {metric_runs:.0f}, cell_receipts_written_total {metric_receipts:.0f}, "
              f"receipt chain {chain_count}, answered here {len(tally.execution_ids)}")
        if not (metric_runs == metric_receipts == chain_count >= len(tally.execution_ids)):
            failures.append(f"/metrics does not match the runs made: runs {metric_runs}, receipts {metric_receipts}, "
                            f"chain {chain_count}, answered {len(tally.execution_ids)}")

        # -- close every cell --------------------------------------------
        def kill(cell: CellState) -> bool:
            try:
                return cell.sbx.kill()
            except SandboxException as exc:
                tally.failed(f"kill cell {cell.index}", exc)
                return True

        with ThreadPoolExecutor(max_workers=16) as pool:
            killed = list(pool.map(kill, cells))
        if not all(killed):
            failures.append(f"{killed.count(False)} cells were already gone before kill")
        ours = {c.sbx.sandbox_id for c in cells}
        leftover = [i.sandbox_id for i in Sandbox.list(server.url, server.api_key) if i.sandbox_id in ours]
        if leftover:
            failures.append(f"{len(leftover)} cells still listed after killing them")
        rss_end = tree_rss(server.proc.pid)
        client.close()

        # -- report ------------------------------------------------------
        per_cell = (rss_load - rss_start) / max(1, len(cells))
        bound = RSS_BOUND_FIXED + RSS_BOUND_PER_CELL * max(1, len(cells))
        if rss_load > bound:
            failures.append(f"server RSS {rss_load >> 20} MB over the bound {bound >> 20} MB for {len(cells)} cells")
        failures.extend(f"HTTP 5xx: {e}" for e in tally.server_errors[:20])
        failures.extend(f"hang: {h}" for h in tally.hangs[:20])
        lat_ms = [x * 1000 for x in tally.latencies if x > 0]
        print(f"runs answered:   {runs} in {load_s:.1f} s = {runs / load_s:.1f} runs/s ({args.clients} clients)")
        print(f"latency:         p50 {pct(lat_ms, 0.50):.1f} ms, p99 {pct(lat_ms, 0.99):.1f} ms, max {max(lat_ms or [0]):.1f} ms")
        print(f"errors by code:  {dict(tally.errors) or 'none'}")
        print(f"receipts:        {len(tally.execution_ids)} checked, {len(missing)} missing; chain {verdict}")
        print(f"server RSS:      start {rss_start >> 20} MB, {len(cells)} cells open {rss_open >> 20} MB, "
              f"after load {rss_load >> 20} MB, after kill {rss_end >> 20} MB")
        print(f"RSS per cell:    {per_cell / (1 << 20):.1f} MB (after load, above the idle server)")
    finally:
        for c in cells:
            c.sbx.close()
        server.stop()
    if tally.server_errors:
        print("\nserver-side causes of the 500s (from its log): count, last appliance frame, exception")
        for (where, what), count in summarize_tracebacks(server.log).most_common(10):
            print(f"  {count:4d}  {where}  {what}")
    if failures:
        print(f"\nFAIL: {len(failures)} correctness problem(s):")
        for f in failures[:50]:
            print("  -", f)
        return 1
    print("\nPASS: state, files, receipts and chain intact; no 500, no hang; memory bounded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
