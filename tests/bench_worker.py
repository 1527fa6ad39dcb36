#!/usr/bin/env python3
"""A worker alone, in process: persistent `print(1+1)` runs sent through its
pipe as the supervisor sends them (typed frames, a volume limit so the disk
watch and the after-run usage walk are paid), next to the engine floor (the
same session called directly) and the after-run volume walk on its own.

No web process, no HTTP: the figures are the worker's own per-run cost
(receive loop, request thread, disk watch, usage walk, reply). The machine
is shared: compare the worker's figures with the floor of the same run.
``--runs N`` per measurement (default 1000). A benchmark: exits non-zero
only if a run answers wrongly.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from appliance.runtime import protocol  # noqa: E402
from appliance.runtime.stack import on_guest_stack, start_guest_thread  # noqa: E402
from appliance.runtime.worker import Worker, _volume_usage  # noqa: E402
from tests.in_process import worker_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1000, help="per measurement (default 1000)")
    runs = ap.parse_args(argv).runs
    root = tempfile.mkdtemp(prefix="cell-bench-worker-")
    parent, child = multiprocessing.Pipe()
    config = worker_config(root, lanes=2)
    worker = Worker(child, config)
    start_guest_thread(lambda: worker.serve(announce=False, refill_thread=True), "bench-serve")
    volume = f"{root}/vols/bench/c1"
    os.makedirs(volume, mode=0o700)
    limit = protocol.VolumeLimit(bytes=1 << 30, entries=100_000)

    def request(req_id: int, code: bytes) -> protocol.ExecRequest:
        return protocol.ExecRequest(req_id, template="python3", code=code, is_text=True, timeout_ms=10_000,
                                    memory_mb=256, tenant_id="bench", cell_id="c1", volume=volume,
                                    volume_limit=limit)

    def one(req_id: int) -> float:
        started = time.perf_counter()
        parent.send_bytes(protocol.encode(request(req_id, b"print(1+1)")))
        while True:
            msg = protocol.decode(parent.recv_bytes(), protocol.FROM_WORKER, 1 << 30)
            if isinstance(msg, protocol.RunReply) and msg.req_id == req_id:
                if msg.outcome.stdout != "2\n":
                    raise SystemExit(f"wrong answer {msg.outcome.stdout!r}")
                return time.perf_counter() - started

    try:
        for i in range(30):
            one(i)
        cpu0 = time.process_time()
        times = [one(100 + i) for i in range(runs)]
        cpu = (time.process_time() - cpu0) * 1000 / runs
        session = worker.sessions["c1"]
        floor_times = []
        floor_cpu0 = time.process_time()
        for _ in range(runs):
            t0 = time.perf_counter()
            on_guest_stack(lambda: session.run(b"print(1+1)", 10.0, 1 << 20, None, None))
            floor_times.append(time.perf_counter() - t0)
        floor_cpu = (time.process_time() - floor_cpu0) * 1000 / runs
        walk0 = time.perf_counter()
        for _ in range(runs):
            _volume_usage(volume, request(0, b""))
        walk_us = (time.perf_counter() - walk0) / runs * 1e6
    finally:
        parent.close()  # the serve loop ends on EOF
        shutil.rmtree(root, ignore_errors=True)
    print(f"worker through its pipe: p50 {statistics.median(times) * 1000:.3f} ms, CPU {cpu:.3f} ms/run "
          "(worker and this client, one process)")
    print(f"engine floor, same session: p50 {statistics.median(floor_times) * 1000:.3f} ms, CPU {floor_cpu:.3f} ms/run")
    print(f"after-run volume usage walk (/data and /tmp of a small cell): {walk_us:.1f} us")
    print(f"load average {os.getloadavg()[0]:.2f} (2 cores shared)")
    os._exit(0)  # live Stores at interpreter exit make wasmtime panic (as in the worker)


if __name__ == "__main__":
    sys.exit(main())
